"""Achieved rate of the video encoder node on a simulated camera (``affective-trm benchmark video-node``).

A camera thread publishes 640x480 rgb8 frames showing a face (scikit-image's astronaut photograph)
at ``--fps`` on a private namespace; a :class:`VideoEncoderNode` runs in the same process on a
multi-threaded executor, as ``affective-trm run`` runs it. After ``--warmup`` seconds the benchmark
counts, for ``--seconds``: frames published, embeddings published (the achieved rate), frames the
node dropped to stay on the newest one, the node's own per-frame processing time (conversion +
face detection + encoder) and the capture-to-publish latency (image stamp to embedding arrival).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

# The camera of the seed data and the rate the fusion is clocked at.
DEFAULT_FPS = 30.0
DEFAULT_SECONDS = 20.0
DEFAULT_WARMUP_S = 5.0
# Threads for CPU timing: the robot-side budget is stated for a 2-core CPU.
DEFAULT_THREADS = 2
NAMESPACE = '/video_node_bench'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--plugin', default='hsemotion_enet_b0', help='video encoder plugin')
    parser.add_argument('--detector', default='mtcnn', help='face detector: mtcnn or haar')
    parser.add_argument('--device', default='cpu', help="'cpu' (default), 'auto', 'cuda' or 'cuda:N'")
    parser.add_argument('--weights', default='', help='explicit weight file')
    parser.add_argument('--allow-untrained', action='store_true',
                        help='run with random weights when none are found (timing is the same)')
    parser.add_argument('--fps', type=float, default=DEFAULT_FPS, help='camera frame rate')
    parser.add_argument('--max-rate', type=float, default=DEFAULT_FPS, help="the node's max_rate parameter")
    parser.add_argument('--seconds', type=float, default=DEFAULT_SECONDS, help='measured duration')
    parser.add_argument('--warmup', type=float, default=DEFAULT_WARMUP_S, help='unmeasured seconds first')
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--threads', type=int, default=DEFAULT_THREADS, help='torch CPU threads')
    parser.add_argument('--json', type=Path, help='write the results as JSON to this file')


def face_frame(width: int, height: int) -> np.ndarray:
    """A (height, width, 3) uint8 frame with a face in the middle (scikit-image's astronaut)."""
    import cv2
    from skimage import data

    side = min(width, height)
    face = cv2.resize(data.astronaut(), (side, side), interpolation=cv2.INTER_AREA)
    canvas = np.full((height, width, 3), 90, np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    canvas[top:top + side, left:left + side] = face
    return canvas


def run(args: argparse.Namespace) -> int:
    import rclpy
    import torch
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from affective_msgs.msg import ModalityEmbedding

    from affective_trm_ros.nodes.common import RELIABLE_QOS, LatencyWindow
    from affective_trm_ros.nodes.video_encoder_node import VideoEncoderNode

    torch.set_num_threads(args.threads)
    pixels = face_frame(args.width, args.height)
    context = rclpy.Context()
    rclpy.init(context=context)
    params = [Parameter('plugin', value=args.plugin), Parameter('detector', value=args.detector),
              Parameter('device', value=args.device), Parameter('weights', value=args.weights),
              Parameter('allow_untrained', value=args.allow_untrained),
              Parameter('max_rate', value=args.max_rate), Parameter('compressed_topic', value='')]
    node = VideoEncoderNode(context=context, namespace=NAMESPACE, parameter_overrides=params)
    probe = rclpy.create_node('video_node_bench_camera', namespace=NAMESPACE, context=context)
    executor = MultiThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(probe)
    received = []   # (image stamp s, arrival s, valid)
    probe.create_subscription(ModalityEmbedding, 'affect/embedding/video',
                              lambda m: received.append((m.header.stamp.sec + m.header.stamp.nanosec * 1e-9,
                                                         time.time(), m.valid)), RELIABLE_QOS)
    camera = probe.create_publisher(Image, 'image_raw', 10)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    message = Image(encoding='rgb8', height=args.height, width=args.width, step=args.width * 3)
    message.data = pixels.tobytes()
    try:
        deadline = time.monotonic() + 10.0
        while camera.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        published, dropped_before = 0, 0
        start = time.time()
        measure_from = start + args.warmup
        end = measure_from + args.seconds
        period = 1.0 / args.fps
        next_frame = time.monotonic()
        while time.time() < end:
            now = time.time()
            if published == 0 and now >= measure_from:
                dropped_before = node.worker.dropped
                node.processing_time = LatencyWindow()   # forget the warm-up frames
            message.header.stamp.sec, message.header.stamp.nanosec = int(now), int((now % 1) * 1e9)
            camera.publish(message)
            if now >= measure_from:
                published += 1
            next_frame += period
            time.sleep(max(0.0, next_frame - time.monotonic()))
        time.sleep(1.0)   # let the frame in progress finish
        dropped = node.worker.dropped - dropped_before
        measured = [r for r in received if measure_from <= r[0] < end]
        latencies = np.array([arrival - stamp for stamp, arrival, _ in measured])
        results = {
            'plugin': node.encoder.identity, 'detector': args.detector, 'device': str(node.encoder.device),
            'torch_threads': args.threads, 'frame': f'{args.width}x{args.height} rgb8',
            'camera_fps': args.fps, 'max_rate': args.max_rate, 'seconds': args.seconds,
            'frames_published': published, 'embeddings': len(measured),
            'valid_embeddings': sum(1 for *_, valid in measured if valid),
            'achieved_rate_hz': len(measured) / args.seconds, 'frames_dropped': dropped,
            'processing_p50_ms': node.processing_time.percentile(50) * 1e3,
            'processing_p95_ms': node.processing_time.percentile(95) * 1e3,
            'latency_p50_ms': float(np.percentile(latencies, 50) * 1e3) if latencies.size else float('nan'),
            'latency_p95_ms': float(np.percentile(latencies, 95) * 1e3) if latencies.size else float('nan'),
        }
    finally:
        executor.shutdown()
        node.destroy_node()
        probe.destroy_node()
        context.try_shutdown()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + '\n')
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
