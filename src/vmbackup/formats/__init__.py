"""Readers and checkers for the files a backup holds: XXH64, tar streams, XVA, VHD."""
