"""argparse as pgbeat's commands use it: usage errors that point at the mistake (exit 2,
with the usage of the command that was being read), help that shows every default,
and shell completion generated from the same parsers."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterator
from typing import NoReturn

_NUMBER = re.compile(r"-\d+(\.\d+)?")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; each option's default after its help, unless
    the help already says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default in (None, argparse.SUPPRESS)
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        if default is False and action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An option that is not one of this command's is refused before anything else is
    checked, naming the closest one ("--evry: did you mean --every?")."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _subcommands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def check_options(self, args: list[str]) -> None:
        if "-" not in self.prefix_chars:
            return
        known = self._option_string_actions
        commands = self._subcommands()
        takes_value = False
        for arg in args:
            if arg == "--" or (arg in commands and not takes_value):
                return
            if takes_value:
                takes_value = False
                continue
            if not arg.startswith("-") or arg == "-" or _NUMBER.fullmatch(arg):
                continue
            name = arg.split("=", 1)[0]
            action = known.get(name)
            if action is None:
                close = difflib.get_close_matches(name, [o for o in known if o.startswith("--")], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.error(f"unknown option {name}{hint}")
            takes_value = "=" not in arg and action.nargs != 0 and action.nargs != "?"

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        self.check_options(args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


# ---------------------------------------------------------------- completion


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash completion function for every command, option and option value with choices;
    zsh loads it through bashcompinit."""
    prog = parser.prog
    words, values = [], []
    for path, sub in _walk(parser):
        key = " ".join(path)
        offered = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                offered = list(action.choices) + offered
            elif action.choices and action.option_strings:
                for option in action.option_strings:
                    values.append(f'        "{key}|{option}") opts="{" ".join(map(str, action.choices))}" ;;')
            elif action.choices and not action.option_strings:
                offered = [str(c) for c in action.choices] + offered
        words.append(f'        "{key}") opts="{" ".join(offered)}" ;;')
    paths = "|".join(f'"{" ".join(path)}"' for path, _ in _walk(parser) if path)
    func = f"_{prog}_complete"
    script = f"""# {prog} completion for {shell}: eval "$({prog} completion {shell})" in your shell's rc file
{func}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" word opts=""
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "${{path:+$path }}$word" in
            {paths}) path="${{path:+$path }}$word" ;;
        esac
    done
    case "$path|$prev" in
{chr(10).join(values)}
        *)
            case "$path" in
{chr(10).join(words)}
            esac ;;
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -F {func} {prog}
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script
