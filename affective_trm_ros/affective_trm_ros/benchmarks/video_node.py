"""Achieved rate of the video encoder node on a simulated camera (``affective-trm benchmark video-node``).

A camera thread publishes 640x480 rgb8 frames showing ``--faces`` real faces (crops of
scikit-image's astronaut photograph, swaying a few pixels per frame) at ``--fps`` on a private
namespace; a :class:`VideoEncoderNode` runs in the same process on a
multi-threaded executor, as ``affective-trm run`` runs it. After ``--warmup`` seconds the benchmark
counts, for ``--seconds``: frames published, embeddings published (the achieved rate), frames the
node dropped to stay on the newest one, the node's own per-frame processing time (conversion +
face detection + encoder) and the capture-to-publish latency (image stamp to embedding arrival).
``--face-pipeline`` picks the node's path (``tracked``, the default, or ``full_frame``), so one
command measures both; with ``--faces 2`` use ``--max-faces 2`` to encode both faces (the achieved
rate then counts frames: embeddings / faces).
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
# A robot runs several nodes, each with one torch thread (tools/env.sh sets OMP_NUM_THREADS=1).
DEFAULT_THREADS = 1
CLIP_FRAMES = 40          # the camera loops over this many swaying frames
NAMESPACE = '/video_node_bench'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--plugin', default='hsemotion_enet_b0', help='video encoder plugin')
    parser.add_argument('--detector', default='mtcnn', help='face detector: mtcnn or haar')
    parser.add_argument('--face-pipeline', default='tracked', choices=('tracked', 'full_frame'),
                        help="the node's face_pipeline parameter (default tracked)")
    parser.add_argument('--faces', type=int, default=1, help='faces in every frame (default 1)')
    parser.add_argument('--max-faces', type=int, default=1, help="the node's max_faces parameter")
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


def run(args: argparse.Namespace) -> int:
    import rclpy
    import torch
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from affective_msgs.msg import ModalityEmbedding
    from affective_trm_ros.benchmarks.face_frames import moving_faces
    from affective_trm_ros.nodes.common import RELIABLE_QOS, LatencyWindow
    from affective_trm_ros.nodes.video_encoder_node import VideoEncoderNode

    torch.set_num_threads(args.threads)
    clip = moving_faces(CLIP_FRAMES, args.width, args.height, faces=args.faces,
                        head_height=min(210, args.height * 7 // 16))
    context = rclpy.Context()
    rclpy.init(context=context)
    params = [Parameter('plugin', value=args.plugin), Parameter('detector', value=args.detector),
              Parameter('device', value=args.device), Parameter('weights', value=args.weights),
              Parameter('allow_untrained', value=args.allow_untrained),
              Parameter('max_rate', value=args.max_rate),
              Parameter('face_pipeline', value=args.face_pipeline),
              Parameter('max_faces', value=args.max_faces)]
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
    messages = []
    for pixels in clip:
        message = Image(encoding='rgb8', height=args.height, width=args.width, step=args.width * 3)
        message.data = pixels.tobytes()
        messages.append(message)
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
        sent = 0
        while time.time() < end:
            now = time.time()
            message = messages[sent % len(messages)]
            sent += 1
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
        frames_answered = len({stamp for stamp, _, _ in measured})
        latencies = np.array([arrival - stamp for stamp, arrival, _ in measured])
        results = {
            'plugin': node.encoder.identity, 'detector': args.detector, 'device': str(node.encoder.device),
            'face_pipeline': args.face_pipeline, 'faces_in_frame': args.faces, 'max_faces': args.max_faces,
            'torch_threads': args.threads, 'frame': f'{args.width}x{args.height} rgb8',
            'camera_fps': args.fps, 'max_rate': args.max_rate, 'seconds': args.seconds,
            'frames_published': published, 'embeddings': len(measured),
            'valid_embeddings': sum(1 for *_, valid in measured if valid),
            'frames_answered': frames_answered, 'achieved_rate_hz': frames_answered / args.seconds,
            'frames_dropped': dropped,
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
