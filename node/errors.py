"""The node's typed errors, each with one wire code: the public path to them.

They are defined once, in :mod:`lmcache_mesh.mesh.errors`, because the mesh's own calls to
peers raise and catch them too.
"""

from lmcache_mesh.mesh.errors import *  # noqa: F403 - this module re-exports them all
from lmcache_mesh.mesh.errors import __all__ as __all__
