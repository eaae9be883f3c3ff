"""Task families: determinism, disjoint splits, reference answers, verifiers, the corpus."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re

import pytest

from sandbox_env.tasks import (
    SPLITS,
    extract_answer,
    family_names,
    format_final,
    get_family,
    normalize,
    parse_number,
    split_bucket,
)
from sandbox_env.tasks.corpus import ATTRIBUTES, RELATIONS, Corpus, CorpusConfig

CORPUS = Corpus.generate(CorpusConfig())


def make_family(name, **kw):
    if name == "retrieval":
        kw.setdefault("corpus", CORPUS)
    return get_family(name, **kw)


@pytest.mark.parametrize("name", family_names())
def test_same_split_index_seed_gives_same_task(name):
    fam = make_family(name)
    a, b = fam.make("train", 7, 3), fam.make("train", 7, 3)
    assert (a.prompt, a.answer, a.files, a.id) == (b.prompt, b.answer, b.files, b.id)
    assert a.id == f"{name}-train-000007"
    c = fam.make("train", 7, 4)
    assert c.prompt != a.prompt  # the seed changes the task


FAMILY_VARIANTS = [(n, {}) for n in family_names() if n != "retrieval"] + [("retrieval", {"hops": 1}), ("retrieval", {"hops": 3})]


@pytest.mark.parametrize("name,kw", FAMILY_VARIANTS, ids=[f"{n}{kw.get('hops', '')}" for n, kw in FAMILY_VARIANTS])
def test_train_and_heldout_never_share_a_question(name, kw):
    fam = make_family(name, **kw)
    by_split = {s: [fam.make(s, i, seed) for seed in (0, 1, 2) for i in range(40)] for s in SPLITS}
    # a question is its prompt plus the files its setup writes (file tasks share prompt templates)
    prompts = {s: {t.prompt + json.dumps(t.files, sort_keys=True) for t in ts} for s, ts in by_split.items()}
    keys = {s: {json.dumps(fam.split_key(t.params), sort_keys=True) for t in ts} for s, ts in by_split.items()}
    assert not prompts["train"] & prompts["heldout"]
    assert not keys["train"] & keys["heldout"]
    for s, ts in by_split.items():
        assert all(t.split == s and split_bucket(fam.name, fam.split_key(t.params)) == s for t in ts)
    # not a degenerate family: the split draws many distinct questions
    assert len(keys["train"]) > 60 and len(keys["heldout"]) > 60


def test_split_and_index_are_validated():
    fam = get_family("arith")
    with pytest.raises(ValueError, match="split must be one of"):
        fam.make("test", 0)
    with pytest.raises(ValueError, match="non-negative int"):
        fam.make("train", -1)


def test_registry_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        get_family("nope")
    with pytest.raises(ValueError, match="does not take options"):
        get_family("arith", hops=3)
    with pytest.raises(ValueError, match="hops must be an int >= 1"):
        get_family("retrieval", hops=0, corpus=CORPUS)


# ----------------------------------------------------------------------------- reference answers


def test_compute_references_against_independent_math():
    arith, dates, primes, strings = (get_family(n) for n in ("arith", "dates", "primes", "strings"))
    for i in range(30):
        t = arith.make("train", i)
        p = t.params
        if p["kind"] == "product":
            assert int(t.answer) == int(p["a"]) * int(p["b"])
        elif p["kind"] == "power_mod":
            assert int(t.answer) == pow(int(p["a"]), p["e"], int(p["m"]))
        t = dates.make("train", i)
        p = t.params
        if p["kind"] == "days_between":
            assert int(t.answer) == (dt.date.fromisoformat(p["end"]) - dt.date.fromisoformat(p["start"])).days
        elif p["kind"] == "add_days":
            assert dt.date.fromisoformat(t.answer) - dt.date.fromisoformat(p["date"]) == dt.timedelta(days=p["days"])
        else:
            assert t.answer in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
        t = primes.make("train", i)
        n, ans = t.params["n"], int(t.answer)
        fermat = lambda m: pow(2, m - 1, m) == 1  # noqa: E731  (independent of the family's Miller-Rabin)
        if t.params["kind"] == "largest_prime_factor":
            m, factors = n, []
            for q in range(2, 200_001):  # the family multiplies primes below 200000
                while m % q == 0:
                    factors.append(q)
                    m //= q
            assert m == 1 and max(factors) == ans
        elif t.params["kind"] == "next_prime":
            assert fermat(ans) and not any(fermat(m) for m in range(n + 1, ans))
        t = strings.make("train", i)
        if t.params["kind"] == "count_overlapping":
            txt, pat = t.params["text"], t.params["pattern"]
            assert int(t.answer) == len(re.findall(f"(?={pat})", txt))


def test_known_small_prime_answers():
    fam = get_family("primes")
    # the 1000th prime is 7919 and there are 78498 primes below 10**6: the reference code agrees
    assert fam.build({"kind": "nth_prime", "n": 1000})[1] == "7919"
    assert fam.build({"kind": "prime_count", "n": 10**6})[1] == "78498"
    assert fam.build({"kind": "next_prime", "n": 10**9})[1] == "1000000007"
    assert fam.build({"kind": "largest_prime_factor", "n": 13195})[1] == "29"


def test_retrieval_answer_follows_the_chain_in_the_corpus():
    fam = get_family("retrieval", hops=4, corpus=CORPUS)
    for i in range(20):
        t = fam.make("train", i)
        p = t.params
        assert len(p["relations"]) == 3 and f'"{p["start_name"]}"' in t.prompt
        cur = next(e for e in CORPUS.entities.values() if e["name"] == p["start_name"])
        for r in p["relations"]:
            assert RELATIONS[r][0] == cur["type"]
            cur = CORPUS.entities[cur[r]]
        assert t.answer == str(cur[p["attribute"]])


def test_corpus_is_deterministic_and_states_each_fact_once():
    again = Corpus.generate(CorpusConfig())
    assert again.docs == CORPUS.docs
    assert Corpus.generate(CorpusConfig(seed=1)).docs != CORPUS.docs
    titles = [d["title"] for d in CORPUS.docs]
    assert len(set(titles)) == len(titles)  # names are unique across all entities
    docs = {d["id"]: d for d in CORPUS.docs}
    for eid, e in list(CORPUS.entities.items())[::7]:
        text = docs[eid]["text"]
        for r, (src, _) in RELATIONS.items():
            if src == e["type"]:
                assert CORPUS.name(e[r]) in text
        for a, (t, numeric) in ATTRIBUTES.items():
            if t == e["type"]:
                v = f"{e[a]:,}" if numeric and a in ("population", "employees") else str(e[a])
                assert text.count(v) >= 1
    with pytest.raises(ValueError, match="corpus.people must be an int >= 4"):
        CorpusConfig(people=2)


def test_files_family_references_match_the_files():
    fam = get_family("files")
    kinds = set()
    for i in range(40):
        t = fam.make("train", i)
        kinds.add(t.params["kind"])
        assert t.files and all(p.startswith("data/") for p in t.files)
        if t.params["kind"] == "largest_file":
            sizes = sorted(((len(v), k) for k, v in t.files.items()), reverse=True)
            assert sizes[0][0] > sizes[1][0] and sizes[0][1].endswith("/" + t.answer)
        if t.params["kind"] == "count_files":
            assert int(t.answer) == sum(k.endswith("." + t.params["ext"]) for k in t.files)
    assert kinds == {"count_matching", "largest_file", "csv_sum", "count_files"}


# ----------------------------------------------------------------------------- verifiers


def test_extract_answer_takes_the_last_answer_line():
    assert extract_answer("Answer: 1\nmore thinking\nAnswer: 2") == "2"
    assert extract_answer("**Answer:** `42`") == "`42`"
    assert extract_answer("the answer is 3") is None
    assert extract_answer(None) is None
    assert extract_answer(format_final("Done.", "x y")) == "x y"


def test_normalize_and_parse_number():
    assert normalize(' **"Port Takar".** ') == "port takar"
    assert normalize("Port  Takar", case_sensitive=True) == "Port Takar"
    assert parse_number("48,213") == 48213 and parse_number("1.5e3") == 1500.0
    assert parse_number("2020-01-05") is None and parse_number("abc") is None


def test_verify_numeric_text_and_case():
    arith, strings, retrieval = get_family("arith"), get_family("strings"), get_family("retrieval", corpus=CORPUS)
    t = arith.make("train", 0)
    assert arith.verify(t, f"Answer: {t.answer}")["correct"]
    assert arith.verify(t, f"Answer: {int(t.answer):,}")["correct"]  # thousands separators are fine
    v = arith.verify(t, f"Answer: {int(t.answer) + 1}")
    assert not v["correct"] and "numeric mismatch" in v["reason"]  # big ints compare exactly, no float tolerance
    big = dataclasses.replace(t, answer=str(3**80))
    assert arith.verify(big, f"Answer: {3**80}")["correct"]
    assert not arith.verify(big, f"Answer: {float(3**80):e}")["correct"]  # a float-rounded big int is not exact
    assert not arith.verify(big, f"Answer: {float(3**80)}")["correct"]
    t125 = dataclasses.replace(t, answer="125")
    assert arith.verify(t125, "Answer: 125.0")["correct"] and not arith.verify(t125, "Answer: 125.5")["correct"]
    v = arith.verify(t, "I think it is big.")
    assert not v["correct"] and v["answer"] is None and "no 'Answer:" in v["reason"]
    ts = next(strings.make("train", i) for i in range(50) if strings.make("train", i).params["kind"] == "transform")
    assert strings.verify(ts, f"Answer: {ts.answer}")["correct"]
    assert not strings.verify(ts, f"Answer: {ts.answer.swapcase()}")["correct"]  # case matters for strings
    tr = next(retrieval.make("train", i) for i in range(50) if not retrieval.make("train", i).answer.isdigit())
    assert retrieval.verify(tr, f"Answer: {tr.answer.upper()}.")["correct"]  # names are case-insensitive


def test_float_answers_use_a_relative_tolerance():
    fam = get_family("files")
    t = next(fam.make("train", i) for i in range(200) if fam.make("train", i).params.get("column") == "price")
    x = float(t.answer)
    assert fam.verify(t, f"Answer: {x * (1 + 1e-12)!r}")["correct"]  # float noise of a python sum
    assert not fam.verify(t, f"Answer: {x + 0.01:.2f}")["correct"]


def test_ensure_corpus_builds_once_and_indexes_every_document(tmp_path):
    from sandbox_env import SearchIndex
    from sandbox_env.tasks.corpus import ensure_corpus

    cfg = CorpusConfig(seed=3, people=20, companies=6, places=6)
    corpus, path = ensure_corpus(cfg, tmp_path)
    mtime = os.stat(path).st_mtime_ns
    corpus2, path2 = ensure_corpus(cfg, tmp_path)
    assert path2 == path and os.stat(path).st_mtime_ns == mtime and corpus2.docs == corpus.docs
    index = SearchIndex(path)
    assert len(index) == len(corpus.docs) == 32
    d = corpus.docs[5]
    assert index.get(d["id"])["text"] == d["text"]
    assert index.search(d["title"], k=3)[0]["id"] == d["id"]
    assert ensure_corpus(CorpusConfig(seed=4, people=20, companies=6, places=6), tmp_path)[1] != path
