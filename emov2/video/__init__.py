"""Video classification with V-EMO: clip data, the video task, the motion demo."""
