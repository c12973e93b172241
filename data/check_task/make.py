# Rebuild the third bundled task, whose teacher is imperfect (as real ones are), and its teacher (CPU, ~15 minutes
# alone on 2 cores):
#     python data/check_task/make.py
# Writes data/check_task/train.jsonl (prompts), heldout.jsonl (prompts with `reference`, or `references` for the
# several-answer types) and teacher/, with its own byte-level BPE tokenizer. CPU training does not reproduce bit
# for bit across thread settings, so a rebuilt teacher differs from the committed one (84.5% greedy; an earlier
# build came out 87.5%): BENCHMARKS.md's figures are for the committed one.
#     python benchmarks/kd_vs_ce.py --tasks check                (KD vs CE-only over 5 seeds, ~29 min on 2 cores)
# Six task types, four with one right answer and two with several (held-out rows of those carry `references`):
#     sub      "What is 85-47?"                         -> "38"
#     count    "How many letters in: banana?"           -> "6"
#     next     "What comes after 3499?"                 -> "3500"
#     repeat   "Say twice: kite"                        -> "kitekite"
#     even     "Name an even digit in: 58213"           -> any of 2, 8
#     greater  "Name a digit above 5 in: 719263"        -> any of 7, 9, 6
# The teacher (the bundled teachers' size, ~1 M parameters) is trained by `llm-distill train`, CE only, on 40,000
# freshly drawn labelled questions that exclude the train and held-out prompts; a several-answer question's label
# is one right answer drawn uniformly, so the teacher learns a distribution over them.
import argparse
import json
import random
import shutil
import string
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llm_distill import train
from llm_distill.config import TrainConfig
from llm_distill.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS
from llm_distill.tiny_task import TEACHER_CONFIG, write_jsonl

TYPES = ("sub", "count", "next", "repeat", "even", "greater")


def word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def example(rng: random.Random, kind: str) -> tuple[str, list[str]]:
    """(question, every right answer)."""
    if kind == "sub":
        a, b = sorted(rng.sample(range(10, 100), 2), reverse=True)
        return f"What is {a}-{b}?", [str(a - b)]
    if kind == "count":
        w = word(rng, 3, 9)
        return f"How many letters in: {w}?", [str(len(w))]
    if kind == "next":
        n = rng.randint(1000, 9998)  # 9,000 questions: more than train + held-out need
        return f"What comes after {n}?", [str(n + 1)]
    if kind == "repeat":
        w = word(rng, 2, 5)
        return f"Say twice: {w}", [w + w]
    while True:
        d = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 7)))
        if kind == "even":
            q, right = f"Name an even digit in: {d}", sorted({c for c in d if int(c) % 2 == 0})
        else:
            t = rng.randint(3, 6)
            q, right = f"Name a digit above {t} in: {d}", sorted({c for c in d if int(c) > t})
        if len(right) >= 2:
            return q, right


def records(n: int, seed: int, exclude: set, prefix: str, distinct: bool = True) -> list[dict]:
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        kind = TYPES[len(out) % len(TYPES)]
        q, right = example(rng, kind)
        if q in seen:
            continue
        if distinct:
            seen.add(q)
        rec = {"id": f"{prefix}{len(out):05d}", "task": kind, "messages": [{"role": "user", "content": q}],
               "reference": rng.choice(right)}
        if kind in ("even", "greater"):
            rec["references"] = right
        out.append(rec)
    return out


def bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2 / Llama 3 / Qwen) with digits split one by one, trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                 bos_token=None, additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--steps", type=int, default=3000, help="teacher training steps (× 64 examples)")
    ap.add_argument("--vocab-size", type=int, default=400)
    a = ap.parse_args()
    out = Path(a.out)
    heldout = records(400, 4321, set(), "h")
    train_prompts = records(5000, 4322, {r["messages"][0]["content"] for r in heldout}, "t")
    for r in train_prompts:  # the distiller's prompts need no answers (the teacher gives them)
        r.pop("reference"), r.pop("references", None)
    write_jsonl(heldout, out / "heldout.jsonl")
    write_jsonl(train_prompts, out / "train.jsonl")
    avoid = {r["messages"][0]["content"] for r in heldout + train_prompts}
    labelled = records(40000, 4423, avoid, "x", distinct=False)

    from datasets import Dataset

    corpus = [text for r in labelled[:10000] for text in (r["messages"][0]["content"], r["reference"])]
    tokenizer = bpe_tokenizer(corpus, a.vocab_size)
    check = tokenizer.apply_chat_template(labelled[0]["messages"] + [{"role": "assistant",
                                          "content": labelled[0]["reference"]}], tokenize=False)
    assert tokenizer.decode(tokenizer(check, add_special_tokens=False)["input_ids"]) == check, "BPE round trip"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tokenizer.save_pretrained(work / "tokenizer")
        Dataset.from_list([{"messages": r["messages"], "completion": r["reference"]} for r in labelled]) \
            .save_to_disk(str(work / "sft"))
        cfg = TrainConfig(dataset=str(work / "sft"), output_dir=str(work / "teacher"),
                          tokenizer=str(work / "tokenizer"),
                          student_config=TEACHER_CONFIG, kd_weight=0.0, ce_weight=1.0, learning_rate=3e-3,
                          warmup_steps=100, max_steps=a.steps, micro_batch_size=64, seed=7, log_every=100,
                          overwrite=True)
        train.main(cfg)
        if (out / "teacher").exists():
            shutil.rmtree(out / "teacher")
        shutil.copytree(work / "teacher", out / "teacher",
                        ignore=shutil.ignore_patterns("checkpoints", "run.json", "tensorboard", "trainer_state.json"))
    print(json.dumps({"teacher": str(out / "teacher"), "vocab": len(tokenizer), "train": len(train_prompts),
                      "heldout": len(heldout)}))


if __name__ == "__main__":
    main()
