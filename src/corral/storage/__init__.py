"""Where tasks and executions live: the Store protocol and its backends."""
