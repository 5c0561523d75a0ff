"""torch.compile's caches must not replay code compiled against another version of attnrewrite's operators.

Inductor's FX graph cache and the AOTAutograd cache key a graph on its code, which names an operator but
not its schema (nor what a composite operator decomposes into).  Tracing an attnrewrite op puts a digest of
the operators' schemas into ``torch.compiler.config.cache_key_tag``, which both caches fold into every key.
"""

import pytest
import torch

import attnrewrite  # noqa: F401  (registers every kind's operators)
from attnrewrite import ops
from attnrewrite.kernels import _ops
from attnrewrite.kernels._ops import CACHE_TAG_PREFIX, cache_key_tag, schema_fingerprint, tag_compile_caches


@pytest.fixture
def no_tag():
    with torch.compiler.config.patch(cache_key_tag=""):  # restores the tag the test leaves
        yield


def _define(namespace: str, schema: str) -> torch.library.Library:
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define(schema)
    return lib


def test_the_fingerprint_follows_the_schemas_and_nothing_else():
    libs = [_define("arw_fp_old", "blockwise(Tensor q, float dropout_p=0.0) -> Tensor"),
            _define("arw_fp_new", "blockwise(Tensor q, float dropout_p=0.0, Tensor? seed=None) -> Tensor"),
            _define("arw_fp_same", "blockwise(Tensor q, float dropout_p=0.0) -> Tensor")]
    old, new, same = (schema_fingerprint(lib.ns) for lib in libs)
    assert old != new  # the op gained an argument: another key
    assert old == same  # the same schemas (in another namespace): the same key
    assert schema_fingerprint() == schema_fingerprint() != schema_fingerprint("arw_fp_empty")


def _twice_sigmoid(x):
    return torch.sigmoid(x) * 2


def _graph_key() -> str:
    """Inductor's FX graph cache key of a small graph (AOTAutograd's key folds in the same details)."""
    from torch._inductor.codecache import compiled_fx_graph_hash

    key, _ = compiled_fx_graph_hash(torch.fx.symbolic_trace(_twice_sigmoid), [torch.ones(3)], {}, [])
    return key


def test_cache_keys_differ_exactly_when_the_schema_fingerprint_does(no_tag, monkeypatch):
    def key_under(fingerprint: str) -> str:
        monkeypatch.setattr(_ops, "schema_fingerprint", lambda namespace=_ops.NAMESPACE: fingerprint)
        with torch._guards.tracing(torch._guards.TracingContext(None)):  # as while torch.compile traces
            tag_compile_caches()
        return _graph_key()

    before_upgrade = key_under("0" * 16)
    assert key_under("1" * 16) != before_upgrade
    assert key_under("0" * 16) == before_upgrade
    # one attnrewrite part at a time, beside the user's own tag
    assert torch.compiler.config.cache_key_tag.count(CACHE_TAG_PREFIX) == 1


def test_the_users_own_tag_is_kept(no_tag):
    torch.compiler.config.cache_key_tag = "mine"
    with torch._guards.tracing(torch._guards.TracingContext(None)):
        tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == f"mine|{cache_key_tag()}"


def test_eager_calls_leave_the_config_alone(no_tag):
    q = torch.randn(1, 1, 4, 8)
    ops.sigmoid_attention(q, q, q)
    assert torch.compiler.config.cache_key_tag == ""


def test_compiling_an_op_tags_the_caches(no_tag):
    """Plain torch.compile (not the attnrewrite backend) on a call of a public op: the tag is in place
    before the caches compute their keys (eager backend: the tag is set while dynamo traces)."""
    torch._dynamo.reset()
    q = torch.randn(1, 2, 8, 16)
    torch.compile(lambda q: ops.sliding_window_attention(q, q, q, window=4), backend="eager", fullgraph=True)(q)
    assert torch.compiler.config.cache_key_tag == cache_key_tag()
