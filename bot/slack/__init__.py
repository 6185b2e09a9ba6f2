"""The Slack channel.  The only package that imports slack_bolt and slack_sdk."""

from bot.slack.channel import SlackChannel

__all__ = ["SlackChannel"]
