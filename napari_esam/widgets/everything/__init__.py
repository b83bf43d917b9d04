"""The 'Segment everything' widget: controller (no Qt) and view."""
