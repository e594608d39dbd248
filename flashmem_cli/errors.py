"""Domain errors. The CLI turns each into a one-line message and a non-zero exit."""


class FlashmemError(Exception):
    """Base of every error a user can cause or fix."""


class ModelNotFound(FlashmemError):
    pass


class InvalidSessionName(FlashmemError):
    pass


class SessionNotFound(FlashmemError):
    pass


class SessionInUse(FlashmemError):
    pass


class SessionCorrupt(FlashmemError):
    """A session file that flashmem did not write in that shape; it is left untouched."""


class ContextOverflow(FlashmemError):
    """A single message does not fit the context, even with every older turn dropped."""


class TemplateError(FlashmemError):
    pass


class EngineError(FlashmemError):
    """llama.cpp refused an operation (decode, state load, context creation)."""
