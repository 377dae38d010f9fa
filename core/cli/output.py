"""What a command prints, decided once: its document as JSON with --json, its lines for a person otherwise."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from core.errors import UserError

# A user's mistake (a bad path, option or file): one line on stderr and exit status 2, never a traceback
USER_ERRORS = (UserError, KeyError, FileNotFoundError, OSError, ValueError)


@dataclass
class Output:
    """A command's result: `doc` is printed as one JSON document when the user asked for --json; otherwise `text`
    (called only then, as some documents are long) gives the lines for a person. `code` is the exit status."""
    doc: object
    text: Callable[[], list[str]] = field(default=lambda: [])
    code: int = 0

    def print(self, as_json: bool) -> int:
        if as_json:
            print(json.dumps(self.doc))
        else:
            for line in self.text():
                print(line)
        return self.code
