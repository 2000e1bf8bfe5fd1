"""``python -m bot``: the ``promptpics`` command line (bot/cli)."""

from bot.cli import run

if __name__ == "__main__":
    run()
