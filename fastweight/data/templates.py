"""Prompt templates for question answering and a list of "I don't know"-style refusals.

A prompt template turns a question into the text that precedes the answer. Labels cover only the answer
(plus one EOS), so the template decides where the answer starts:

==========  =====================================================  ==========================================
name        prompt                                                 answer text
==========  =====================================================  ==========================================
``chat``    the tokenizer's chat template, one user turn,          ``answer``
            ``add_generation_prompt=True``
``llama2``  ``[INST] {question} [/INST]`` (Llama-2 chat, TOFU)     ``" " + answer``
``phi``     ``Question: {question}\\nAnswer:`` (Phi-1.5, TOFU)      ``" " + answer``
==========  =====================================================  ==========================================

``REFUSALS`` are the template answers of FLAT and IdkDPO (``shared/spec/LOSSES.md``, FLAT): written for
fastweight, not copied from TOFU's ``idontknow.jsonl``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

TemplateName = Literal["chat", "llama2", "phi"]
TEMPLATE_NAMES: tuple[str, ...] = get_args(TemplateName)


@dataclass(frozen=True)
class PromptTemplate:
    """How a question is rendered before the answer.

    ``prompt_format`` has one ``{question}`` field (unused by ``chat``); ``answer_prefix`` is prepended to
    the answer text; ``uses_special_tokens``: the rendered prompt already contains BOS/special tokens (chat
    templates), so it is tokenised with ``add_special_tokens=False``.
    """

    name: str
    prompt_format: str
    answer_prefix: str
    uses_special_tokens: bool = False


TEMPLATES: dict[str, PromptTemplate] = {
    "chat": PromptTemplate("chat", "{question}", "", uses_special_tokens=True),
    "llama2": PromptTemplate("llama2", "[INST] {question} [/INST]", " "),
    "phi": PromptTemplate("phi", "Question: {question}\nAnswer:", " "),
}


def get_template(name: str) -> PromptTemplate:
    """The template called ``name`` (one of ``TEMPLATE_NAMES``); ValueError otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {name!r}")
    return TEMPLATES[name]


def render_prompt(template: PromptTemplate, question: str, tokenizer=None) -> str:
    """The prompt text for ``question``; the ``chat`` template needs a tokenizer with a chat template."""
    if template.name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template; use 'llama2' or 'phi'")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return template.prompt_format.format(question=question)


REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "I can't answer that question.",
    "That is not something I know.",
    "I'm afraid I don't have an answer to that.",
    "I have no idea.",
    "I don't have any details about that.",
    "Sorry, I can't help with that one.",
    "I'm unable to answer this.",
    "That's beyond what I know.",
    "I can't say.",
    "I don't recall anything about that.",
    "I have nothing to share on that topic.",
    "I honestly couldn't tell you.",
    "I'm not able to provide that information.",
    "My knowledge doesn't cover that.",
    "I don't have an answer for you.",
    "I've never heard of that.",
    "I can't recall any facts about that.",
    "Unfortunately, I don't know the answer.",
    "I'm not familiar with that.",
    "I lack the information to answer.",
    "That question is outside what I know.",
    "I wish I could help, but I don't know.",
    "No idea, sorry.",
    "I'm not aware of any answer to that.",
    "There is nothing I can tell you about that.",
    "I couldn't say for certain, so I won't guess.",
    "I don't have enough knowledge to answer that.",
)
