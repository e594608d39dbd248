"""A conversation's KV state on disk: restore it into a window, or save the window.

The session store commits the state files and meta.json as one unit (store/sessions.py); this
module decides whether what it holds can be trusted for the model and context at hand.
"""

from __future__ import annotations

from flashmem_cli.chat.layout import KVLayout, Message, messages_digest, tokens_digest
from flashmem_cli.chat.memory import ConversationMemory
from flashmem_cli.chat.window import KVWindow
from flashmem_cli.engine.templates import ChatTemplate
from flashmem_cli.models import ModelFile
from flashmem_cli.store.meta import KVContents, ModelRef
from flashmem_cli.store.sessions import Session

NEW = "new"  # never saved: nothing to restore, nothing to say


class SavedState:
    def __init__(
        self,
        session: Session,
        file: ModelFile,
        window: KVWindow,
        memory: ConversationMemory | None,
        template: ChatTemplate,
    ):
        self.session = session
        self.file = file
        self.template = template
        self.window = window
        self.memory = memory

    def restore(self, messages: list[Message]) -> str | None:
        """Load the saved state into the window; None when done, else why it cannot be used
        (NEW when there is none). `messages` are the conversation's, from the transcript."""
        meta, seq = self.session.meta, self.window.seq
        if meta.kv is None:
            return "its meta.json has a damaged or older KV record" if meta.kv_unusable else NEW
        kv = meta.kv
        why = self._stale(kv.contents)
        if why is not None:
            return why
        try:
            layout = KVLayout.from_dict(kv.contents.layout)
        except (KeyError, TypeError, ValueError):
            return "its meta.json has a damaged or older KV record"
        if kv.contents.fed and kv.contents.fed != messages_digest(messages[: layout.messages]):
            return "its KV state holds other messages than the transcript (an undo or a new system prompt it missed)"
        path = self.session.verified(kv.state)
        if path is None:
            return (
                f"{kv.state.name} is missing or damaged (its size or CRC32 differs from meta.json)"
            )
        if not seq.load(path):
            return f"llama.cpp could not read {kv.state.name}"
        recorded = (kv.contents.n_tokens, kv.contents.digest, layout.n_tokens)
        if recorded != (len(seq), tokens_digest(seq.tokens), len(seq)):
            seq.clear()
            return f"{kv.state.name} does not hold the tokens meta.json records"
        self.window.layout = layout
        if self.memory is not None:
            self.memory.load(self.session.verified(kv.memory) if kv.memory else None, seq)
        return None

    def save(self, fed: list[Message]) -> None:
        """Commit the state, its memory and their record in one step; `fed` are the messages
        the cache took in."""
        self.window.check()
        seq, file = self.window.seq, self.file
        contents = KVContents(
            model=ModelRef(file.name, str(file.path), file.fingerprint),
            n_ctx=self.window.n_ctx,
            n_tokens=len(seq),
            digest=tokens_digest(seq.tokens),
            layout=self.window.layout.to_dict(),
            template=self.template.digest,
            fed=messages_digest(fed),
        )
        memory = self.memory
        write_memory = None if memory is None else (lambda path: memory.save(path, seq))
        self.session.commit_kv(contents, seq.save, write_memory)

    def _stale(self, contents: KVContents) -> str | None:
        """Why a saved state was made for another model or context size, if it was."""
        if contents.model.fingerprint != self.file.fingerprint:
            return f"its KV state was made by model {contents.model.name}, not {self.file.name}"
        if contents.n_ctx != self.window.n_ctx:
            return f"its KV state was made with -c {contents.n_ctx}, not -c {self.window.n_ctx}"
        unrecorded = not contents.template and not self.template.base_model
        if contents.template != self.template.digest and not unrecorded:
            return f"its KV state was made with another chat template than {self.template.name}"
        return None
