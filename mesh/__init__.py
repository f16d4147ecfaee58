"""lmcache_mesh.mesh: membership, the hash ring, the holder index and the mesh's work.

Replication, repair, mesh-wide lookups and cost estimates run behind the small interfaces
of :mod:`.ports`, which node/ implements; :mod:`.simulation` runs all of it on a virtual
clock. Sees chunk keys as opaque 16-byte strings and never imports ``lmcache_mesh.node``.
"""
