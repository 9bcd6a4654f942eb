"""What decodes many sequences at once: batched model work (``batch``). The continuous-batching loops are
``PoE.generate_many`` and the service's worker (``olmo_tap.serve.engine``); the caches live in
``olmo_tap.model.kv_cache``; the decoders that ask for the work in ``olmo_tap.inference.poe``."""
