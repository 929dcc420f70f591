"""ament_python package of the Affective-TRM suite (nodes, core library, offline tools)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE_NAME = 'affective_trm_ros'

setup(
    name=PACKAGE_NAME,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE_NAME]),
        ('share/' + PACKAGE_NAME, ['package.xml']),
        ('share/' + PACKAGE_NAME + '/launch', glob('launch/*.launch.py')),
        ('share/' + PACKAGE_NAME + '/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='Affective-TRM maintainers',
    maintainer_email='maintainers@affective-trm.org',
    description='Continuous valence/arousal estimation for robots: encoder nodes, a stateful '
                'Tiny Recursive Model fusion node, training and rosbag evaluation.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'affective-trm = affective_trm_ros.cli:main',
            'video_encoder = affective_trm_ros.nodes.video_encoder_node:main',
            'audio_encoder = affective_trm_ros.nodes.audio_encoder_node:main',
            'text_encoder = affective_trm_ros.nodes.text_encoder_node:main',
            'fusion = affective_trm_ros.nodes.fusion_node:main',
            'visualizer = affective_trm_ros.nodes.visualizer_node:main',
            'hri_expression = affective_trm_ros.nodes.hri_expression_node:main',
        ],
        # Encoder plugins: name = module:Class (see affective_trm_ros/core/encoders/base.py).
        'affective_trm_ros.encoders': [
            'hsemotion_enet_b0 = affective_trm_ros.core.encoders.video:HSEmotionEncoder',
            'hsemotion_enet_b0_va = affective_trm_ros.core.encoders.video:HSEmotionVAEncoder',
            'fer_mini_xception = affective_trm_ros.core.encoders.fer:FERMiniXceptionEncoder',
            'dasheng_base = affective_trm_ros.core.encoders.audio:DashengEncoder',
            'egemaps = affective_trm_ros.core.encoders.egemaps:EGeMAPSEncoder',
            'embeddinggemma = affective_trm_ros.core.encoders.text:EmbeddingGemmaEncoder',
            'minilm = affective_trm_ros.core.encoders.text:MiniLMEncoder',
        ],
    },
)
