"""lmcache_mesh.mesh: membership, gossiped prefix index, hash ring (arrives with the mesh issue).

Sees chunk keys as opaque 16-byte strings and never imports ``lmcache_mesh.node``.
"""
