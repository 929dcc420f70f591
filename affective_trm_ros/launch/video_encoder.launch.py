"""Launch the video encoder node (camera -> affect/embedding/video).

    ros2 launch affective_trm_ros video_encoder.launch.py [config:=my_video_encoder.yaml] [namespace:=robot1]

`ros2 launch affective_trm_ros video_encoder.launch.py --show-args` lists every argument.
"""

from affective_trm_ros.system import node_launch_description


def generate_launch_description():
    return node_launch_description('video_encoder')
