"""Recording: cameras (and, as the layout moves, the LeRobot dataset writer).

(Placeholder while the layout moves.)
"""


class OpenCVCamera:
    """A USB camera (device index) or a video file, read as (H, W, 3) uint8 RGB frames."""

    def __init__(self, index_or_path, width=640, height=480, fps=None):
        import cv2

        self._cv2 = cv2
        self.source = index_or_path
        self._capture = cv2.VideoCapture(index_or_path)
        if not self._capture.isOpened():
            raise FileNotFoundError(f"cannot open camera {index_or_path!r}: check `ls /dev/video*` or the path")
        self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps is not None:
            self._capture.set(cv2.CAP_PROP_FPS, fps)
        self.width, self.height = width, height
        frame = self.read()
        if frame.shape[:2] != (height, width):
            self.close()
            raise ValueError(f"camera {index_or_path!r} delivers {frame.shape[1]}x{frame.shape[0]} frames, not "
                             f"{width}x{height}: pass width={frame.shape[1]}, height={frame.shape[0]}")

    def read(self):
        ok, bgr = self._capture.read()
        if not ok:
            raise RuntimeError(f"camera {self.source!r} returned no frame (unplugged, or end of the video)")
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)  # OpenCV delivers BGR; datasets are RGB

    def close(self):
        self._capture.release()
