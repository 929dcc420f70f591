"""Launch the visualizer node (camera + estimates -> affect/visualization).

    ros2 launch affective_trm_ros visualizer.launch.py [config:=my_visualizer.yaml] [namespace:=robot1]

`ros2 launch affective_trm_ros visualizer.launch.py --show-args` lists every argument.
"""

from affective_trm_ros.system import node_launch_description


def generate_launch_description():
    return node_launch_description('visualizer')
