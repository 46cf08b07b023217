"""Video classification with V-EMO: clip data, the video task, the motion demo."""
from .data import ClipSampling, VideoDataset, VideoReadError, build_video_datasets, find_videos, read_video, \
    read_video_list, sample_indices, write_video
from .predict import evaluate_video_checkpoint, predict_videos
from .task import VIDEO_DEFAULTS, VideoTask, evaluate_video

__all__ = ['ClipSampling', 'VideoDataset', 'VideoReadError', 'build_video_datasets', 'find_videos', 'read_video',
           'read_video_list', 'sample_indices', 'write_video', 'evaluate_video_checkpoint', 'predict_videos',
           'VIDEO_DEFAULTS', 'VideoTask', 'evaluate_video']
