"""Administration: what the ``dicomnode`` commands do, without argparse, one module per noun.

The nouns: :mod:`.rules`, :mod:`.destinations`, :mod:`.callers`, :mod:`.jobs`, :mod:`.outbox`,
:mod:`.studies`, :mod:`.models`, :mod:`.status`, :mod:`.peers` (echo and send). The pieces they share: :mod:`.durations`,
:mod:`.match` (the ``--match`` language), :mod:`.yamltext` (YAML that reads like the hand-written
files, replaced atomically), :mod:`.rules_file` and :mod:`.config_file` (edits that keep comments
and layout), :mod:`.dry_run` (the rules over files or stored studies, nothing queued).
"""

from __future__ import annotations


class AdminError(Exception):
    """A request that cannot be carried out; the message says why and what to do.

    ``code`` is the CLI exit status: 1 failure, 2 usage or configuration, 3 not applicable.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
