"""The one exception the config package raises."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, located as precisely as it can be.

    ``str(e)`` reads ``"{file}:{line}: {key}: {msg}"``; parts that are ``None``
    are left out, so a missing file reads ``"{file}: {msg}"``.
    """

    def __init__(
        self,
        msg: str,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.msg = msg
        self.file = file
        self.line = line
        self.key = key

    def located(self, file: str, line: int) -> ConfigError:
        """The same error, with a file and line filled in where they were missing."""
        return ConfigError(
            self.msg,
            file=self.file if self.file is not None else file,
            line=self.line if self.line is not None else line,
            key=self.key,
        )

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where = f"{where}:{self.line}" if where is not None else f"line {self.line}"
        return ": ".join(
            part for part in (where, self.key, self.msg) if part is not None
        )

    def __repr__(self) -> str:
        return (
            f"ConfigError({self.msg!r}, file={self.file!r}, line={self.line!r}, "
            f"key={self.key!r})"
        )
