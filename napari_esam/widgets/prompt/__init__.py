"""The 'Segment with prompts' widget: controller (no Qt) and view."""
