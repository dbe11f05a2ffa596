"""``icecache.v1``: the cache service contract. Stubs are (re)generated here when stale."""

from proto.build import ensure_generated

ensure_generated()
