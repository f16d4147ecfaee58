"""lmcache_mesh.engines: engine adapters (llama.cpp, vLLM), built on the node client API."""
