"""Summary attention: a window of chunks in full, one summary key/value per older chunk.

- ``reference`` — the readable oracle (loops over queries, builds every visible set);
- ``chunked`` — the torch path (query blocks over contiguous key ranges, recomputing backward);
- ``op`` — ``attnrewrite::summary_attention`` and its backward as custom ops;
- ``public`` — :func:`summary_attention` (the public wrapper);
- ``state`` — :class:`SummaryPooling`, the learned pooling queries;
"""

from .public import summary_attention
from .state import SummaryPooling

__all__ = ["SummaryPooling", "summary_attention"]
