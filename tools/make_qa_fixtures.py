"""Writes tests/data/qa: small, clearly synthetic StreamingQA and ArchivalQA files in the official
column formats (read by train/data/facts.py: load_qa_file / load_qa_split).

    python tools/make_qa_fixtures.py --out tests/data/qa

Documents come from the synthetic fact stream (train/data/facts.py: invented entities, three
facts each); every document is asked each of its questions. StreamingQA rows carry the
official columns (question, answers with golds joined by a backslash, text, and the metadata
columns of the release); some rows get a second, longer gold so the shortest-answer target is
exercised. ArchivalQA rows carry question, answer, ans_paragraph, ans_text, doc_id, para_num: each
article (doc_id) has two paragraphs (para_num 0 and 1), written in reverse para_num order so the
official stable sort is exercised. Deterministic: rerunning writes the same bytes.
"""
from __future__ import annotations

import argparse
import csv
import pathlib

from train.data import facts

SIZES = {"train": 16, "val": 4, "test": 4}          # documents per split (3 questions each)
SEEDS = {"train": 0, "val": 1, "test": 2}


def _streamingqa(split: str) -> list[dict]:
    docs = facts.fact_stream("train" if split == "train" else "validation" if split == "val"
                             else "test", SIZES[split], SEEDS[split])
    rows = []
    for d in docs:
        for r, qa in enumerate(d["qas"]):
            answers = [qa["answer"]]
            if r == 0:                       # a longer second gold: the target is the shortest
                answers = [f"the city of {qa['answer']}", qa["answer"]]
            rows.append({"qa_id": f"synthetic-{split}-{d['doc_id']}-{r}",
                         "question": qa["question"], "answers": "\\".join(answers),
                         "text": d["document"], "title": d["entity"],
                         "question_ts": "2020-01-01", "evidence_ts": "2019-12-31"})
    return rows


def _archivalqa(split: str) -> list[dict]:
    docs = facts.fact_stream("train" if split == "train" else "validation" if split == "val"
                             else "test", SIZES[split], SEEDS[split] + 10)
    rows = []
    for i in range(0, len(docs) - 1, 2):
        a, b = docs[i], docs[i + 1]          # one article of two paragraphs
        article = a["document"] + "\n" + b["document"]
        for para_num, d in reversed(list(enumerate((a, b)))):
            for qa in d["qas"]:
                answer = qa["answer"]
                rows.append({"question": qa["question"], "answer": answer.lower(),
                             "ans_paragraph": d["document"], "ans_text": article,
                             "doc_id": f"synthetic_{split}_{i // 2}", "para_num": para_num})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tests/data/qa")
    a = p.parse_args(argv)
    for name, make in (("streamingqa", _streamingqa), ("archivalqa", _archivalqa)):
        d = pathlib.Path(a.out) / name
        d.mkdir(parents=True, exist_ok=True)
        for split in SIZES:
            rows = make(split)
            with open(d / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
                w.writeheader()
                w.writerows(rows)


if __name__ == "__main__":
    main()
