"""PromptPics bot: platform adapters and the command line. Never touches torch."""
