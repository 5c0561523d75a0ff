"""Reference models to rewrite, each in one readable file, and the offline data they train on.

- :mod:`~attnrewrite.targets.llama` — Llama decoder (RoPE, GQA, SwiGLU, static KV cache, ``generate``)
- :mod:`~attnrewrite.targets.gpt2` — nanoGPT-style GPT-2 with hand-written and SDPA attention
- :mod:`~attnrewrite.targets.bert` — BERT encoder, MLM head, sentence embeddings, pretrained MiniLM
- :mod:`~attnrewrite.targets.vit` — Vision Transformer classifier
- :mod:`~attnrewrite.targets.singlecell` — Geneformer-style gene-token encoder for single cells
- :mod:`~attnrewrite.targets.data` — stdlib-docstring text, scikit-learn digits, scanpy's PBMC cells

Nothing is imported here, so importing one model does not import the others (or their data).
"""
