"""vhdshare: virtual hard disks (VHD) shared by several virtual machines over clusterfs."""
