"""vmbackup: back up the VMs of a XenServer / XCP-ng pool.

Snapshots the selected VMs, exports them (vm-export to .xva, or vdi-export of
chosen disks to .raw/.vhd), saves their metadata, prunes old backups, backs up
the pool database and the hosts, and reports the truth in its exit code.
Runs from a root crontab on a pool host (shelling out to xe) or from any
machine that reaches the pool (XenAPI plus XAPI's HTTP export handlers).

Usage (modern):
    vmbackup.py -c weekly.cfg
    vmbackup.py -e 'PRD-.*' -x PRD-PRINT -d /backups --max-backups 3 --preview
    vmbackup.py --server https://pool-master --password-file /root/.xapi.pw -e web01

Other commands (each has --help):
    vmbackup.py list ['web.*'] -d /backups          what backups exist, newest first
    vmbackup.py verify /backups                     check backups without a server
    vmbackup.py restore /backups/web01 [--preview]  import the newest backup as a new VM
    vmbackup.py diff /backups/web01                 configuration changes between backups

Usage (NAUbackup VmBackup.py compatible):
    vmbackup.py <password|password-file> <config-file|vm-selector> [preview]
                [compress=True|False] [ignore_extra_keys=True|False]
                [pre_clean=True|False]
    vmbackup.py <password> create-password-file=FILE
    vmbackup.py help|config|example

EXIT STATUS
    0  all selected work succeeded, nothing warned
    1  finished, with warnings (a VM's, or the run's: a selector matched no VM,
       nothing to back up)
    2  something failed (a VM, the pool or host backup, or the run itself), the
       run could not start (usage, configuration, login, unusable backup_dir),
       or it was terminated (SIGTERM)
    --preview exits with the code the run would have.
    Summary S:n W:n E:n: S units that succeeded (with or without warnings),
    W warnings, E failures; the run's own problems count in W or E.
  130  interrupted (Ctrl-C)
"""

__version__ = "0.1.0"
