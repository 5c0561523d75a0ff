"""Every attention site of many HF transformers architectures, rewritten or reported (a sweep for silent misses).

Each architecture is built from its default config shrunk to a tiny size (random weights, no download), with
``attn_implementation="eager"``, and run on a batch of 2 sequences of 12 tokens, the second with 3 padded
positions (encoder-decoders get 7 decoder tokens).  The model is compiled with the attnrewrite backend
(``to="softmax"``, ``compiler="eager"``) and the table lists, per architecture: sites rewritten, attention left
as it was (each with a warning: the reason), near misses (softmaxes that are not attention: routers, ...), and the
largest difference of the output at real (unpadded) tokens from the uncompiled model.  Rows of padded queries are
left out: a query that sees no key gets 0 after the rewrite (README, "Semantics worth knowing").

    python bench/hf_architectures.py                  # the default list
    python bench/hf_architectures.py xglm gpt_oss     # some architectures
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ("qwen3 gemma3_text olmo2 mixtral starcoder2 gptj codegen deberta-v2 deberta mpt cohere stablelm granite "
           "xglm opt mobilebert mbart pegasus blenderbot mt5 umt5 longt5 gpt_bigcode biogpt persimmon qwen3_moe olmoe "
           "squeezebert convbert xlm-roberta ernie megatron-bert gpt_neo big_bird plbart led longformer gpt_oss").split()

#: Attributes set on every config that has them: a tiny model of every architecture.
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_layers=2, num_heads=4, d_ff=64,
             d_kv=16, n_embd=64, n_layer=2, n_head=4, head_dim=16, max_position_embeddings=128, n_positions=128,
             moe_intermediate_size=32, num_local_experts=2, num_experts=2, num_experts_per_tok=1, n_routed_experts=2,
             kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
             embedding_size=64, ffn_dim=64, rotary_dim=8, first_k_dense_replace=1)


def tiny_model(model_type: str):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type)
    for key, value in SMALL.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, ValueError, TypeError):
                pass
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    return AutoModel.from_config(config, attn_implementation="eager").eval(), config


def sweep(model_type: str) -> dict:
    import torch

    import attnrewrite
    from attnrewrite.rewriter.failures import RewriteWarning

    torch.manual_seed(0)
    model, config = tiny_model(model_type)
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :7]
    with torch.no_grad():
        want = model(**inputs)[0]
    torch._dynamo.reset()
    before = len(attnrewrite.recent_reports())
    compiled = torch.compile(model, backend="attnrewrite", options={"to": "softmax", "compiler": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = compiled(**inputs)[0]
    sites = [s for report in attnrewrite.recent_reports()[before:] for s in report.sites]
    real = mask.bool() if got.shape[:2] == mask.shape else torch.ones(got.shape[:2], dtype=torch.bool)
    return dict(model=model_type, rewritten=sum(s.status == "rewritten" for s in sites),
                left=[f"{s.module}: {s.reason}" for s in sites if s.attention_left_as_it_was],
                near=[f"{s.module}: {s.reason}" for s in sites if s.status != "rewritten"
                      and not s.attention_left_as_it_was],
                warned=any(issubclass(w.category, RewriteWarning) for w in caught),
                diff=float((got.float() - want.float()).abs()[real].max()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT))
    args = parser.parse_args(argv)
    print("| architecture | rewritten | left as it was (warned) | near misses | max diff, real tokens |")
    print("|---|---|---|---|---|", flush=True)
    for name in args.models:
        try:
            row = sweep(name)
        except Exception as exc:  # a config this script cannot shrink: say so and go on
            print(f"| {name} | could not build or run: {type(exc).__name__}: {str(exc)[:80]} | | | |", flush=True)
            continue
        left = "; ".join(row["left"]) or "0"
        print(f"| {name} | {row['rewritten']} | {left}{' (warned)' if row['warned'] else ''} | "
              f"{len(row['near'])} | {row['diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
