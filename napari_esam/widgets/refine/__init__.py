"""The 'Refine labels' widget: controller (no Qt) and view."""
