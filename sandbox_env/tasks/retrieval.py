"""Retrieval over the generated corpus: single-hop lookups and multi-hop chains.

A question names a start entity and a chain of relations to follow ("the company where they
work", then "its chief executive"), then asks an attribute of the entity reached. The one
idea: each hop is one search (find the entity's document among namesakes) and one open (read
the fact that names the next entity), so `hops` documents mean about 2 x hops tool calls;
with many hops this is the long-horizon family. The corpus guarantees one right answer
(see sandbox_env/tasks/corpus.py).
"""

from __future__ import annotations

import random
import re
from typing import Any

from sandbox_env.agent.types import AssistantStep
from sandbox_env.tasks.base import Task, TaskFamily, format_final
from sandbox_env.tasks.corpus import RELATIONS, Corpus, CorpusConfig
from sandbox_env.tasks.scripting import ScriptContext, call_with_recovery, quote

TYPE_WORD = {"person": "person", "company": "company", "place": "city"}
STEP_PHRASE = {
    "employer": "go to the company where this person works",
    "birthplace": "go to the city where this person was born",
    "mentor": "go to this person's mentor",
    "headquarters": "go to the city where this company is headquartered",
    "ceo": "go to this company's chief executive",
    "mayor": "go to this city's mayor",
    "twin": "go to this city's twin city",
}
QUESTION = {
    "birth_year": "In what year was this person born?",
    "occupation": "What is this person's occupation?",
    "founded": "In what year was this company founded?",
    "industry": "In which industry does this company work?",
    "employees": "How many people does this company employ?",
    "population": "What is this city's population?",
    "region": "In which region is this city?",
    "established": "In what year was this city established?",
}
# How the scripted teacher reads a fact from a document (the fixed sentences of corpus.py).
FACT_RE = {
    "employer": r"works as an? [a-z ]+? at ([^.]+)\.",
    "birthplace": r"was born in ([^.]+?) in \d{4}\.",
    "mentor": r"'s mentor was ([^.]+)\.",
    "headquarters": r"is headquartered in ([^.]+)\.",
    "ceo": r"Its chief executive is ([^.]+)\.",
    "mayor": r"Its mayor is ([^.]+)\.",
    "twin": r"is twinned with ([^.]+)\.",
    "birth_year": r"was born in [^.]+? in (\d{4})\.",
    "occupation": r"works as an? ([a-z ]+?) at ",
    "founded": r"was founded in (\d{4})",
    "industry": r"works in ([a-z ]+?) and employs",
    "employees": r"employs ([\d,]+) people",
    "population": r"population of ([\d,]+)",
    "region": r"in the ([A-Za-z ]+?) region",
    "established": r"established in (\d{3,4})",
}
_ID_RE = re.compile(r"\b(person|company|place)-\d{4}\b")


def _sentence_with(text: str, span: tuple[int, int]) -> str:
    start = max(text.rfind(". ", 0, span[0]) + 2, 0)
    end = text.find(".", span[1])
    return text[start : end + 1 if end >= 0 else len(text)].strip()


def pick_hit(search_output: str, name: str, etype: str) -> tuple[str, str] | None:
    """From a search tool's output, the doc id of the hit titled `name` of type `etype`: the
    output is cut into one block per doc id; the first block of that type whose text has the
    exact name (as a whole phrase) wins. -> (doc id, the block's text) or None."""
    hits = list(_ID_RE.finditer(search_output))
    name_re = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    for i, m in enumerate(hits):
        if m.group(1) != etype:
            continue
        block = search_output[m.start() : hits[i + 1].start() if i + 1 < len(hits) else len(search_output)]
        # The title is printed on the id's line; demand the name there, so a doc that merely
        # mentions the name in its snippet does not win.
        if name_re.search(block.split("\n", 1)[0]):
            return m.group(0), block.strip()
    return None


def other_hit(search_output: str, doc_id: str, etype: str) -> str | None:
    """Another hit of the same type in a search output (a namesake), or None."""
    for m in _ID_RE.finditer(search_output):
        if m.group(1) == etype and m.group(0) != doc_id:
            return m.group(0)
    return None


class RetrievalFamily(TaskFamily):
    """`hops`: documents to open per question (1 = single-hop lookup)."""

    name = "retrieval"
    tools = ("search", "open")

    def __init__(self, tag: str | None = None, hops: int = 1, corpus: Corpus | None = None, corpus_config: dict | None = None):
        super().__init__(tag)
        if not isinstance(hops, int) or hops < 1:
            raise ValueError(f"retrieval hops must be an int >= 1, got {hops!r}; set tasks.families.<name>.hops")
        self.hops = hops
        self.corpus = corpus or Corpus.generate(CorpusConfig(**(corpus_config or {})))

    def draw(self, rng: random.Random) -> dict[str, Any]:
        start, rels, attr, _ = self.corpus.walk(rng, self.hops)
        e = self.corpus.entities[start]
        return {"start_name": e["name"], "start_type": e["type"], "relations": rels, "attribute": attr}

    def build(self, p: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        cur = next(eid for eid, e in self.corpus.entities.items() if e["name"] == p["start_name"] and e["type"] == p["start_type"])
        for r in p["relations"]:
            cur = self.corpus.entities[cur][r]
        answer = str(self.corpus.entities[cur][p["attribute"]])
        head = f'Start at the {TYPE_WORD[p["start_type"]]} "{p["start_name"]}".'
        if p["relations"]:
            steps = "\n".join(f"Step {i}: {STEP_PHRASE[r]}." for i, r in enumerate(p["relations"], 1))
            prompt = (
                "Answer a question by following links between documents in the collection; use the search and open tools, "
                f"every fact you need is in the documents.\n{head}\n{steps}\nQuestion: {QUESTION[p['attribute']]}"
            )
        else:
            prompt = f"Use the search and open tools to look this up in the document collection.\n{head}\nQuestion: {QUESTION[p['attribute']]}"
        return prompt, answer, {}

    def script(self, task: Task, ctx: ScriptContext):
        p = task.params
        chain = [p["start_type"]] + [RELATIONS[r][1] for r in p["relations"]]
        name, etype = p["start_name"], p["start_type"]
        if p["relations"]:
            route = " -> ".join([f'"{name}"'] + [r for r in p["relations"]]) + f" -> {p['attribute']}"
            thinking = (
                f"This is a {len(chain)}-document chain: {route}. For each entity I'll search its name, take the hit whose title "
                "is exactly that name (there may be namesakes), open it, and read the one fact that leads on. "
                f'First, find the {TYPE_WORD[etype]} "{name}".'
            )
        else:
            thinking = f'I need the {p["attribute"].replace("_", " ")} of the {TYPE_WORD[etype]} "{name}". I\'ll search for the name, open the matching document and read it there.'
        for hop, want in enumerate(p["relations"] + [p["attribute"]]):
            out = yield from call_with_recovery(ctx, "search", name, thinking)
            hit = pick_hit(out, name, etype)
            if hit is None:
                thinking = f'None of the hits is a {TYPE_WORD[etype]} titled exactly "{name}". Searching again, adding the word {TYPE_WORD[etype]}.'
                out = (yield AssistantStep(thinking, "", [ctx.call("search", f"{name} {TYPE_WORD[etype]}")]))[0]
                hit = pick_hit(out, name, etype)
            if hit is None:
                yield AssistantStep(
                    f'I could not find a document titled "{name}" in two searches, so I cannot follow the chain further.',
                    format_final(f'I could not find "{name}" in the collection.', "unknown"),
                )
                return
            doc_id, block = hit
            title_line = quote(next((ln for ln in out.splitlines() if doc_id in ln), block.splitlines()[0]).strip(), 120)
            thinking = f'The search lists "{title_line}": id {doc_id} is the {TYPE_WORD[etype]} "{name}". Opening it.'
            namesake = other_hit(out, doc_id, etype)
            if namesake is not None and ctx.err():
                # a misread result list: open a namesake, notice the title, go back to the right hit
                ctx.mistake()
                misread = f'The search returned several {TYPE_WORD[etype]} documents; I take {namesake} to be "{name}". Opening it.'
                wrong = (yield AssistantStep(misread, "", [ctx.call("open", namesake)]))[0]
                seen_title = quote(wrong.splitlines()[0] if wrong else "", 120)
                thinking = (
                    f'This document starts "{seen_title}": it is not "{name}", I opened the wrong search hit ({namesake}). '
                    f'The hit titled exactly "{name}" is {doc_id}; opening that one.'
                )
            text = yield from call_with_recovery(ctx, "open", doc_id, thinking, typo=(doc_id, doc_id[:-1]))
            m = re.search(FACT_RE[want], text)
            page = 1
            while m is None and f"page={page + 1}" in text:  # a long document: read on
                page += 1
                thinking = f"Page {page - 1} of {doc_id} does not state the {want.replace('_', ' ')}; reading page {page}."
                text = (yield AssistantStep(thinking, "", [ctx.call("open", doc_id, page=page)]))[0]
                m = re.search(FACT_RE[want], text)
            if m is None:
                yield AssistantStep(
                    f"The document {doc_id} does not state the {want.replace('_', ' ')} in any sentence I can find.",
                    format_final(f"The document for {name} does not say.", "unknown"),
                )
                return
            value, sentence = m.group(1).strip(), _sentence_with(text, m.span())
            if want in RELATIONS:
                nxt = RELATIONS[want][1]
                thinking = (
                    f'The document says: "{sentence}" So step {hop + 1} leads to the {TYPE_WORD[nxt]} "{value}". '
                    f"Next I search for {value}."
                )
                name, etype = value, nxt
            else:
                yield AssistantStep(
                    f'The document says: "{sentence}" That gives the {want.replace("_", " ")} of {name}: {value}. '
                    + (f"Every hop of the chain was read from its own document, so {value} is the answer." if p["relations"] else "That answers the question."),
                    format_final(f"Following the documents, the {want.replace('_', ' ')} of {name} is {value}.", value),
                )
                return
