"""A generated world of fictional people, companies and cities, as documents to search.

Retrieval tasks need facts that no pretrained model already knows and that a program can
check, so the project invents them: from a seed, `Corpus.generate` makes entities with
attributes (birth years, populations, industries) and relations (employer, headquarters,
mayor, mentor, twin city) and writes one short encyclopedia-style document per entity. The one
idea: every fact sits in exactly one fixed sentence of exactly one document, so a multi-hop
question has one right answer, reachable only by searching and opening documents hop by hop.
Names share first names and surnames on purpose, so search returns near misses to tell apart.

The corpus and its SQLite FTS5 index are cached on disk by `ensure_corpus`, keyed by the
config, so every worker and every rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# relation -> (source type, target type); attribute -> (entity type, is numeric)
RELATIONS: dict[str, tuple[str, str]] = {
    "employer": ("person", "company"),
    "birthplace": ("person", "place"),
    "mentor": ("person", "person"),
    "headquarters": ("company", "place"),
    "ceo": ("company", "person"),
    "mayor": ("place", "person"),
    "twin": ("place", "place"),
}
ATTRIBUTES: dict[str, tuple[str, bool]] = {
    "birth_year": ("person", True),
    "occupation": ("person", False),
    "founded": ("company", True),
    "industry": ("company", False),
    "employees": ("company", True),
    "population": ("place", True),
    "region": ("place", False),
    "established": ("place", True),
}
# The fixed sentence that states each fact; the scripted teacher reads facts back with these.
SENTENCES = {
    "person": "{name} was born in {birthplace} in {birth_year}. {name} works as {article} {occupation} at {employer}. {name}'s mentor was {mentor}.",
    "company": "{name} was founded in {founded} and is headquartered in {headquarters}. Its chief executive is {ceo}. {name} works in {industry} and employs {employees:,} people.",
    "place": "{name} is a city in the {region} region with a population of {population:,}. It was established in {established}. Its mayor is {mayor}. {name} is twinned with {twin}.",
}
_FILLER = {
    "person": ["{name} is known among colleagues for {hobby}.", "In interviews, {name} has spoken about {hobby}.", "Outside of work, {name} spends time on {hobby}."],
    "company": ["The company is often mentioned in connection with {topic}.", "Analysts have written about its approach to {topic}.", "Its annual report highlights {topic}."],
    "place": ["Visitors know the city for {sight}.", "Local guides recommend {sight}.", "The city's best-known landmark is {sight}."],
}
_OCCUPATIONS = ["architect", "botanist", "cartographer", "engineer", "geologist", "historian", "illustrator", "journalist", "librarian",
                "mathematician", "navigator", "oceanographer", "pharmacist", "translator", "veterinarian", "astronomer", "economist", "sculptor"]
_INDUSTRIES = ["shipbuilding", "textiles", "software", "logistics", "biotechnology", "publishing", "mining", "renewable energy",
               "food processing", "aerospace", "insurance", "ceramics"]
_REGIONS = ["Northmark", "Eastvale", "Sundering Coast", "Highmoor", "Westreach", "Lowfen", "Amber Hills", "Greymere"]
_HOBBIES = ["restoring clocks", "long-distance rowing", "amateur astronomy", "beekeeping", "chess problems", "folk music", "bookbinding"]
_TOPICS = ["supply chains", "workplace safety", "export markets", "research partnerships", "energy efficiency", "apprenticeships"]
_SIGHTS = ["its covered market", "the old lighthouse", "a stone bridge", "the botanical garden", "its harbour walls", "the clock tower"]
_COMPANY_SUFFIX = ["Holdings", "Industries", "Works", "Labs", "Group", "Systems", "Trading", "Partners"]
_PLACE_PATTERNS = ["{w}", "{w}", "{w}", "Port {w}", "{w} Falls", "New {w}", "{w} Bay"]
_ON, _NUC, _CODA = "bdfgklmnprstvzbrdrtrkl", "aeiouaeio", ["", "n", "r", "l", "s", "th", "nd", "rk", "m", "x"]


@dataclass
class CorpusConfig:
    """How big a world to generate. Larger worlds give more distinct retrieval questions."""

    seed: int = 0
    people: int = 300
    companies: int = 80
    places: int = 60

    def __post_init__(self):
        for k in ("people", "companies", "places"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 4:
                raise ValueError(f"corpus.{k} must be an int >= 4, got {getattr(self, k)!r}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _syllables(rng: random.Random, n: int) -> str:
    s = "".join(rng.choice(_ON) + rng.choice(_NUC) for _ in range(n)) + rng.choice(_CODA)
    return s.capitalize()


def _unique_words(rng: random.Random, count: int, used: set[str], lo: int, hi: int) -> list[str]:
    out = []
    while len(out) < count:
        w = _syllables(rng, rng.randint(lo, hi))
        if w.lower() not in used:
            used.add(w.lower())
            out.append(w)
    return out


class Corpus:
    """The generated world: `entities` (id -> dict of name, type, attributes, relation ids) and
    `docs` ([{"id", "title", "text"}], one per entity; the title is the entity's name)."""

    def __init__(self, config: CorpusConfig, entities: dict[str, dict[str, Any]]):
        self.config = config
        self.entities = entities
        self.by_type: dict[str, list[str]] = {}
        for eid, e in entities.items():
            self.by_type.setdefault(e["type"], []).append(eid)
        self.docs = [self._doc(e) for e in entities.values()]

    @classmethod
    def generate(cls, config: CorpusConfig | None = None) -> Corpus:
        cfg = config or CorpusConfig()
        rng = random.Random(f"corpus|{cfg.seed}")
        used: set[str] = set()
        # Few first names and surnames, many combinations: search for a full name returns
        # namesakes, which the reader must tell apart by the exact title.
        firsts = _unique_words(rng, max(8, cfg.people // 6), used, 2, 2)
        lasts = _unique_words(rng, max(8, cfg.people // 4), used, 2, 3)
        names: list[str] = []
        seen: set[str] = set()
        while len(names) < cfg.people:
            n = f"{rng.choice(firsts)} {rng.choice(lasts)}"
            if n not in seen:
                seen.add(n)
                names.append(n)
        companies = [f"{w} {rng.choice(_COMPANY_SUFFIX)}" for w in _unique_words(rng, cfg.companies, used, 2, 3)]
        places = [rng.choice(_PLACE_PATTERNS).format(w=w) for w in _unique_words(rng, cfg.places, used, 2, 3)]

        P = [f"person-{i:04d}" for i in range(cfg.people)]
        C = [f"company-{i:04d}" for i in range(cfg.companies)]
        L = [f"place-{i:04d}" for i in range(cfg.places)]
        ent: dict[str, dict[str, Any]] = {}
        for i, pid in enumerate(P):
            mentor = rng.choice([q for q in P[max(0, i - 40) : i + 40] if q != pid])
            ent[pid] = {"id": pid, "type": "person", "name": names[i], "birth_year": rng.randint(1900, 2000),
                        "occupation": rng.choice(_OCCUPATIONS), "employer": rng.choice(C), "birthplace": rng.choice(L),
                        "mentor": mentor, "hobby": rng.choice(_HOBBIES), "pronoun": rng.choice(["she", "he", "they"])}
        for i, cid in enumerate(C):
            ent[cid] = {"id": cid, "type": "company", "name": companies[i], "founded": rng.randint(1800, 2020),
                        "industry": rng.choice(_INDUSTRIES), "employees": rng.randint(12, 250000),
                        "headquarters": rng.choice(L), "ceo": rng.choice(P), "topic": rng.choice(_TOPICS)}
        for i, lid in enumerate(L):
            ent[lid] = {"id": lid, "type": "place", "name": places[i], "population": rng.randint(800, 5_000_000),
                        "region": rng.choice(_REGIONS), "established": rng.randint(900, 1950), "mayor": rng.choice(P),
                        "twin": rng.choice([q for q in L if q != lid]), "sight": rng.choice(_SIGHTS)}
        return cls(cfg, ent)

    def name(self, eid: str) -> str:
        return self.entities[eid]["name"]

    def _doc(self, e: dict[str, Any]) -> dict[str, str]:
        rng = random.Random(f"doc|{self.config.seed}|{e['id']}")
        fields = dict(e)
        for rel, (src, _) in RELATIONS.items():
            if src == e["type"]:
                fields[rel] = self.name(e[rel])
        fields["article"] = "an" if str(e.get("occupation", "x"))[0] in "aeiou" else "a"
        facts = SENTENCES[e["type"]].format(**fields)
        filler = rng.choice(_FILLER[e["type"]]).format(**fields)
        text = f"{facts} {filler}" if rng.random() < 0.5 else f"{filler} {facts}"
        return {"id": e["id"], "title": e["name"], "text": text}

    def walk(self, rng: random.Random, hops: int) -> tuple[str, list[str], str, str]:
        """A random question: (start id, relations to follow, attribute asked, end id). `hops` is
        the number of documents the reader must open: hops - 1 relations."""
        for _ in range(100):
            start = rng.choice(sorted(self.entities))
            cur, rels, seen = start, [], {start}
            for _ in range(hops - 1):
                options = [r for r, (src, _) in RELATIONS.items() if src == self.entities[cur]["type"] and self.entities[cur][r] not in seen]
                if not options:
                    break
                r = rng.choice(options)
                rels.append(r)
                cur = self.entities[cur][r]
                seen.add(cur)
            if len(rels) == hops - 1:
                attr = rng.choice([a for a, (t, _) in ATTRIBUTES.items() if t == self.entities[cur]["type"]])
                return start, rels, attr, cur
        raise ValueError(f"corpus found no {hops}-hop path without revisits; lower the family's hops or raise corpus sizes")

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "docs.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for d in self.docs:
                f.write(json.dumps(d) + "\n")
        os.replace(tmp, out / "docs.jsonl")


def ensure_corpus(config: CorpusConfig, cache_dir: str | os.PathLike) -> tuple[Corpus, str]:
    """The corpus for `config` and the path of its SQLite FTS5 index, built once under
    `cache_dir/corpus-<config key>/` and reused after (generation is deterministic, so a
    cached index always matches the regenerated corpus)."""
    from sandbox_env.sandbox import SearchIndex

    corpus = Corpus.generate(config)
    d = Path(cache_dir) / f"corpus-{config.key()}"
    index_path = d / "index.sqlite"
    if not index_path.exists():
        corpus.save(d)
        (d / "config.json").write_text(json.dumps(asdict(config), indent=2))
        tmp = d / f"index.sqlite.tmp{os.getpid()}"
        if tmp.exists():
            tmp.unlink()
        SearchIndex.build(str(tmp), corpus.docs)
        os.replace(tmp, index_path)  # atomic: a concurrent reader never sees half an index
    return corpus, str(index_path)
