"""Launch the fusion node (embeddings -> affect/valence_arousal).

    ros2 launch affective_trm_ros fusion.launch.py [config:=my_fusion.yaml] [namespace:=robot1]

`ros2 launch affective_trm_ros fusion.launch.py --show-args` lists every argument.
"""

from affective_trm_ros.system import node_launch_description


def generate_launch_description():
    return node_launch_description('fusion')
