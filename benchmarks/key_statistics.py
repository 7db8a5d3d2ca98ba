"""Tokens per second of key second-moment collection for 5 layers.

Ours: one batched forward pass for all layers that stops after the deepest edited layer
(`sphere_lightning.editors.statistics.second_moments`). Reference, in the same process: one full
forward pass per layer at batch size 1, as public editing code does. Both read the same WikiText-2
paragraphs, and the results are compared.

    python benchmarks/key_statistics.py --num-texts 64 --max-length 128
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from sphere_lightning.editors.statistics import read_corpus, second_moments
from sphere_lightning.models import architecture_of, load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def reference_second_moments(model, tokenizer, spec, layers, texts, max_length):
    """One full forward pass per layer and per text (batch size 1)."""
    results = {}
    captured: dict[str, torch.Tensor] = {}
    for layer in layers:
        module = model.get_submodule(spec.mlp_out_name(layer))
        total, count = 0, 0
        handle = module.register_forward_hook(lambda m, a, o: captured.update(k=a[0]))
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            with torch.no_grad():
                model(**ids)
            k = captured["k"][0].double()
            total = total + k.T @ k
            count += k.shape[0]
        handle.remove()
        results[layer] = (total / count).float()
    return results, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="3,4,5,6,7")
    parser.add_argument("--corpus", default=str(SHARED / "corpus" / "wikitext-2-raw-test.txt"))
    parser.add_argument("--num-texts", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    model, tokenizer = load_model(args.model)
    spec = architecture_of(model)
    texts = read_corpus(args.corpus, args.num_texts)

    start = time.perf_counter()
    ref, tokens = reference_second_moments(model, tokenizer, spec, layers, texts, args.max_length)
    ref_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        ours = second_moments(
            model,
            tokenizer,
            spec,
            layers,
            corpus=args.corpus,
            num_samples=args.num_texts,
            max_length=args.max_length,
            batch_size=args.batch_size,
            cache_dir=cache,
        )
        ours_s = time.perf_counter() - start
    diff = max(float((ours[i] - ref[i]).abs().max() / ref[i].abs().max()) for i in layers)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"second moments of {len(layers)} layers {layers}, {len(texts)} texts, {tokens} tokens")
    print(f"{'path':<44}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'reference: 1 full pass per layer, batch 1':<44}{ref_s:>10.2f}{tokens / ref_s:>12.0f}")
    label = f"ours: 1 pass, stops at layer {max(layers)}, batch {args.batch_size}"
    print(f"{label:<44}{ours_s:>10.2f}{tokens / ours_s:>12.0f}")
    print(f"speed-up: {ref_s / ours_s:.1f}x   max relative difference: {diff:.2e}")
    print(f"peak RSS of the process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
