"""MkDocs hook: `<!-- cxr-help COMMAND -->` in a page becomes that cxr subcommand's `--help`, generated from the
CLI's own argparse parser when the site is built, so the documented options never drift from the real ones."""

import os
import re


def on_page_markdown(markdown, page, config, files):
    os.environ["COLUMNS"] = "110"  # argparse wraps at the terminal's width; the site's is fixed
    from cxr.cli import build_parser

    commands = next(action for action in build_parser()._actions if action.dest == "command").choices

    def help_of(match):
        name = match.group(1)
        if name not in commands:
            raise ValueError(f"{page.file.src_path}: cxr has no subcommand {name!r}")
        return f"```text\n{commands[name].format_help()}```"

    return re.sub(r"<!-- cxr-help (\w+) -->", help_of, markdown)
