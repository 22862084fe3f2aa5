"""Several daemons as one service (docs/cluster.md): the shared call registry and its Redis store."""
