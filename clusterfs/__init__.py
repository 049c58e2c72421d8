"""clusterfs: a clustered FUSE file system over one shared block directory."""

__version__ = "0.1.0"
