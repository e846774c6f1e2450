"""Attention over the paged KV cache: the only op of the model that is split per request.

The model runner describes each step once, in backend-neutral terms (`metadata.AttentionMetadata`);
each backend turns that into what its kernels need (`build`), once per step, before any layer runs.
"""
