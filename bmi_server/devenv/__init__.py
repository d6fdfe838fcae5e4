"""Developer and test environment helpers: throwaway Ceph cluster, demo."""
