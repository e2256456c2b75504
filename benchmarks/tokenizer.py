"""Encode throughput: s1serve's tokenizer against the reference `tokenization_interns1.py`, side by side.

    .venv/bin/python benchmarks/tokenizer.py [--reference-python /tmp/refvenv/bin/python]
                                             [--reference-dir /tmp/ref/checkpoints/Intern-S1-Pro]

The corpus is the golden one (tests/fixtures/tokenizer/encode_golden.json: prose, CJK, code, numbers, emoji,
whitespace, special tokens, SMILES/protein/DNA, long words, random text), used two ways: every text on its own,
and documents of --doc-texts texts joined by blank lines (closer to real prompts). For each of the two, each side
starts from empty caches, makes one pass (cold), then --passes more passes of which the fastest counts (warm:
both sides have cached their BPE results). Times are the CPU seconds of the encoding process, which the other
work on a shared machine disturbs less than wall time; both sides are single-threaded. The reference runs in a
subprocess of its own Python (transformers + the published remote code, outside this repository); without it
the reference columns are empty and a line says why.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from s1serve.assets import ASSETS_DIR  # noqa: E402
from s1serve.tokenizer import load_tokenizer  # noqa: E402

CORPUS = REPO / "tests" / "fixtures" / "tokenizer" / "encode_golden.json"
GROUPS = {
    "english": "prose",
    "other_scripts": "prose",
    "cjk": "CJK",
    "code": "code",
    "numbers": "numbers, emoji, spaces",
    "emoji": "numbers, emoji, spaces",
    "combining": "numbers, emoji, spaces",
    "whitespace": "numbers, emoji, spaces",
    "control": "numbers, emoji, spaces",
    "added_tokens": "special tokens",
    "misc": "special tokens",
    "markers": "special tokens",
    "domain_tags": "SMILES/protein/DNA",
    "auto_smiles": "SMILES/protein/DNA",
    "auto_protein_dna": "SMILES/protein/DNA",
    "molformula": "SMILES/protein/DNA",
    "smiles_mutations": "SMILES/protein/DNA",
    "long": "long words",
    "fuzz": "random text",
    "random_codepoints": "random text",
}

# Runs inside the reference's Python. Reads {"runs": [[[label, [text, ...]], ...], ...], "passes": n} on stdin;
# each run starts from empty caches. Prints, per run, {"cold": [seconds per group], "warm": [[seconds per group]
# per pass], "ids": [[ids per text] per group]}.
REFERENCE_SCRIPT = r"""
import json, sys, time, logging
logging.disable(logging.WARNING)
from transformers import AutoTokenizer
job = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
def one_pass(groups, keep_ids):
    seconds, ids = [], []
    for _, texts in groups:
        t0 = time.process_time()
        out = [tok.encode(t) for t in texts]
        seconds.append(time.process_time() - t0)
        ids.append(out if keep_ids else None)
    return seconds, ids
results = []
for groups in job["runs"]:
    tok.cache.clear()
    cold, ids = one_pass(groups, True)
    warm = [one_pass(groups, False)[0] for _ in range(job["passes"])]
    results.append({"cold": cold, "warm": warm, "ids": ids})
json.dump(results, sys.stdout)
"""


def run_ours(model_dir: Path, groups: list[tuple[str, list[str]]], passes: int) -> dict:
    tok = load_tokenizer(model_dir)  # fresh caches for the cold pass

    def one_pass(keep_ids: bool) -> tuple[list[float], list]:
        seconds, ids = [], []
        for _, texts in groups:
            t0 = time.process_time()
            out = [tok.encode(t) for t in texts]
            seconds.append(time.process_time() - t0)
            ids.append(out if keep_ids else None)
        return seconds, ids

    cold, ids = one_pass(True)
    warm = [one_pass(False)[0] for _ in range(passes)]
    return {"cold": cold, "warm": warm, "ids": ids}


def run_reference(python: Path, ref_dir: Path, runs: list[list[tuple[str, list[str]]]], passes: int) -> list | str:
    """The reference's results per run, or a sentence saying why there are none."""
    if not python.exists():
        return f"reference skipped: no Python at {python}"
    if not (ref_dir / "tokenization_interns1.py").exists():
        return f"reference skipped: no tokenization_interns1.py in {ref_dir}"
    job = json.dumps({"runs": runs, "passes": passes})
    proc = subprocess.run(
        [str(python), "-c", REFERENCE_SCRIPT, str(ref_dir)], input=job, capture_output=True, text=True
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no message)"]
        return "reference skipped: it failed: " + lines[-1]
    return json.loads(proc.stdout)


def table_rows(
    groups: list[tuple[str, list[str]]], ours: dict, ref: dict | None, which: list[int], label: str
) -> list[tuple[str, ...]]:
    """Rows for the groups in `which` added up: first pass (cold) and fastest later pass (warm)."""
    texts = sum(len(groups[g][1]) for g in which)
    chars = sum(len(t) for g in which for t in groups[g][1])
    same = "-" if ref is None else ("yes" if all(ours["ids"][g] == ref["ids"][g] for g in which) else "NO")
    rows = []
    for kind in ("cold", "warm"):
        if kind == "cold":
            ours_s = sum(ours["cold"][g] for g in which)
            ref_s = sum(ref["cold"][g] for g in which) if ref else None
        else:
            ours_s = min(sum(p[g] for g in which) for p in ours["warm"])
            ref_s = min(sum(p[g] for g in which) for p in ref["warm"]) if ref else None
        ratio = "-" if ref_s is None else f"{ref_s / max(ours_s, 1e-9):.1f}x"
        rows.append((f"{label}, {kind}", str(texts), str(chars), f"{ours_s:.4f}",
                     "-" if ref_s is None else f"{ref_s:.4f}", ratio, same))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", type=Path, default=Path("/tmp/refvenv/bin/python"))
    parser.add_argument("--reference-dir", type=Path, default=Path("/tmp/ref/checkpoints/Intern-S1-Pro"))
    parser.add_argument("--model-dir", type=Path, default=ASSETS_DIR, help="s1serve loads its tokenizer from here")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--passes", type=int, default=5, help="warm passes; the fastest counts")
    parser.add_argument("--doc-texts", type=int, default=20, help="texts per document")
    args = parser.parse_args()

    cases = json.loads(args.corpus.read_text(encoding="utf-8"))["cases"]
    by_group: dict[str, list[str]] = {}
    for case in cases:
        by_group.setdefault(GROUPS.get(case["category"], case["category"]), []).append(case["text"])
    shuffled = [c["text"] for c in cases]
    random.Random(0).shuffle(shuffled)
    docs = ["\n\n".join(shuffled[i : i + args.doc_texts]) for i in range(0, len(shuffled), args.doc_texts)]

    runs = [list(by_group.items()), [("documents", docs)]]  # each run starts from empty caches
    ours = [run_ours(args.model_dir, groups, args.passes) for groups in runs]
    ref = run_reference(args.reference_python, args.reference_dir, runs, args.passes)
    skip_note = ref if isinstance(ref, str) else None
    texts_run, docs_run = runs
    ref_texts, ref_docs = (None, None) if skip_note else ref

    rows = []
    everything = list(range(len(texts_run)))
    for g in everything:
        rows += table_rows(texts_run, ours[0], ref_texts, [g], f"texts: {texts_run[g][0]}")
    rows += table_rows(texts_run, ours[0], ref_texts, everything, "texts: all")
    rows += table_rows(docs_run, ours[1], ref_docs, [0], f"documents of {args.doc_texts} texts")

    header = ("workload, pass", "texts", "chars", "s1serve s", "reference s", "ratio", "ids identical")
    print(f"CPU seconds of each encoding process (both single-threaded); warm = fastest of {args.passes} more passes")
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    if skip_note:
        print(skip_note)


if __name__ == "__main__":
    main()
