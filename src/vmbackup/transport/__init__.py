"""How vmbackup reaches a pool: one Transport interface, over XenAPI + HTTP or over xe."""
