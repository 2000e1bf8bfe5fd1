"""The Slack adapter (slack-bolt's AsyncApp, slack_sdk's Web API client).

- app.py: ``SlackApp``: bolt listeners, Socket Mode and HTTP mode, commands, reactions, de-duplication
- outlet.py: ``SlackOutlet`` (status messages, uploads, reactions), text escaping, the client's retries
"""

from bot.slack.app import SlackApp, SlackLoginFailure
from bot.slack.outlet import PLATFORM, SlackOutlet, configure_client, slack_text, unescape

__all__ = ["PLATFORM", "SlackApp", "SlackLoginFailure", "SlackOutlet", "configure_client", "slack_text", "unescape"]
