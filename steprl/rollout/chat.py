"""Token ids of conversations from the model's own chat template, and the tool set-up a template needs."""
from __future__ import annotations

import json

from steprl.models.tiny import CHATML_TEMPLATE
from steprl.tasks.base import Task
from steprl.tools import function_schema, get_tools


class ChatRenderer:
    """Token ids for prompts and for what follows an assistant turn, from the model's own template."""

    def __init__(self, tokenizer, tools_schema: list[dict] | None = None):
        self.tok = tokenizer
        self.tools_schema = tools_schema
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "@@END@@"}]
        rendered = self._render(probe, add_generation_prompt=False)
        self.turn_end = rendered.split("@@END@@", 1)[1]  # e.g. "<|im_end|>\n"
        self._probe = probe
        self._probe_text = rendered

    def check_prefix_stable(self) -> None:
        """Rollouts append each turn's tokens to the ones before it, so the template must render a
        conversation extended by one turn as the rendering before it, then the turn. Templates
        that rewrite earlier turns (dropping a past turn's reasoning, say) break that: one line."""
        convo = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
        before = self._render(convo, add_generation_prompt=True)
        for k in range(2):
            turn = {"role": "assistant", "content": f'A{k} <tool_call>{{"name": "f", "arguments": {{}}}}</tool_call>'}
            convo = convo + [turn, {"role": "tool", "content": str(40 + k)}]
            after = self._render(convo, add_generation_prompt=True)
            if not after.startswith(before + turn["content"]):
                at = next((i for i, (x, y) in enumerate(zip(after, before + turn["content"])) if x != y), len(before))
                raise ValueError(f"chat template of '{self.tok.name_or_path}' is not prefix-stable: a conversation "
                                 f"extended by one turn renders differently before it (at character {at}: "
                                 f"{after[max(0, at - 20):at + 20]!r}); rollouts cannot append turns to its token ids")
            before = after

    def _render(self, messages, add_generation_prompt):
        kwargs = {"tools": self.tools_schema} if self.tools_schema else {}
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self._render(messages, add_generation_prompt=True))

    def observation_ids(self, tool_messages: list[dict], finished_with_eos: bool) -> list[int]:
        """Closing of the assistant turn (the part not sampled) + tool messages + next header."""
        full = self._render(self._probe + tool_messages, add_generation_prompt=True)
        after = full[len(self._probe_text):]
        closing = self.turn_end
        if finished_with_eos and self.tok.eos_token and closing.startswith(self.tok.eos_token):
            closing = closing[len(self.tok.eos_token):]
        return self.encode(closing + after)

    def conversation_ids(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation, segmented exactly as a rollout produces it:
        prompt, then per assistant turn its content + EOS (mask 1) and what follows (mask 0)."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise ValueError("conversation has no assistant message to train on")
        ids = self.prompt_ids(messages[: turns[0]])
        mask = [0] * len(ids)
        for k, i in enumerate(turns):
            sampled = self.encode(messages[i]["content"]) + [self.tok.eos_token_id]
            ids += sampled
            mask += [1] * len(sampled)
            if k + 1 < len(turns):
                obs = self.observation_ids(messages[i + 1: turns[k + 1]], finished_with_eos=True)
                ids += obs
                mask += [0] * len(obs)
        return ids, mask


def tool_setup(task: Task, tokenizer):
    """(tools, renderer, system-prompt suffix) for a task and a model's chat template.

    The embedded tokenizer was trained on the protocol and needs no description. A template that
    takes `tools` (Qwen, Llama 3.1 ...) gets the JSON schemas; any other gets them in the system
    prompt, with the Hermes call format spelled out. A task with no tools (single-turn PBRFT)
    gets no tools and, on a foreign template, only the answer format.
    """
    tools = get_tools(list(task.tool_names))
    schemas = [function_schema(fn) for fn in tools.values()]
    template = tokenizer.chat_template or ""
    if template == CHATML_TEMPLATE:
        renderer, suffix = ChatRenderer(tokenizer), ""
    elif not schemas:
        renderer, suffix = ChatRenderer(tokenizer), " " + task.answer_format
    elif "tools" in template:  # the template renders the schemas and the tool role itself
        renderer, suffix = ChatRenderer(tokenizer, schemas), " " + task.answer_format
    else:
        described = "\n".join(json.dumps(s["function"]) for s in schemas)
        renderer = ChatRenderer(tokenizer)
        suffix = (f"\nYou can call these tools:\n{described}\nTo call one, write "
                  '<tool_call>{"name": NAME, "arguments": {...}}</tool_call> and wait for its result. '
                  + task.answer_format)
    renderer.check_prefix_stable()
    return tools, renderer, suffix
