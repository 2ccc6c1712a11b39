"""The UI's message catalogue: English, Chinese and Russian, one flat mapping of keys per language.

Config keys (`train.lr`) and the CLI's messages are not translated: they are what the YAML, the docs and the
terminal say, so a user can search for them. The config sections' titles and each key's help are translated
in `config_help_i18n` (English: the schema's own help). Everything else the page says is here;
tests/ui/test_logic.py checks that every key used by the UI exists in all three languages with the same
placeholders.
"""

from __future__ import annotations

LANGUAGES = {"en": "English", "zh": "中文", "ru": "Русский"}

CATALOGUE: dict[str, dict[str, str]] = {
    "en": {
        "app.title": "## loratune: fine-tune, chat, evaluate, export",
        "tab.train": "Train", "tab.data": "Data", "tab.chat": "Chat", "tab.eval": "Evaluate",
        "tab.export": "Export", "tab.runs": "Runs",
        "train.load_from": "Load a config file (YAML in the workspace)", "train.load": "Load",
        "train.launch": "Start training", "train.stop": "Stop (saves a checkpoint)", "train.resume": "Resume",
        "train.job": "Training run", "train.curve": "Loss", "train.log": "Log", "train.yaml": "Config (YAML)",
        "train.download": "Download YAML", "train.plan": "Memory plan (loratune plan)",
        "train.no_job": "Choose a training run first.", "train.stopping": "Stopping: a checkpoint is being saved.",
        "train.not_running": "That run is not running.",
        "train.progress": "**{run}**: {status} · step {step} · loss {loss}",
        "status.running": "running", "status.finished": "finished", "status.stopped": "stopped (checkpoint saved)",
        "status.failed": "failed", "status.ended": "ended",
        "data.file": "Dataset file (in the workspace)", "data.upload": "Upload a dataset file",
        "data.model": "Model (its tokenizer and template)", "data.format": "Format", "data.template": "Chat template",
        "data.samples_n": "Samples to show", "data.preview": "Preview", "data.rendered":
            "Samples as the model sees them (green: supervised tokens)", "data.stats": "**Statistics**",
        "chat.base": "Base model (when no adapter is chosen)", "chat.adapters": "Adapters (trained runs)",
        "chat.load": "Load", "chat.system": "System prompt", "chat.prompt": "Your message", "chat.send": "Send",
        "chat.clear": "Clear", "chat.loaded": "Loaded: {names}", "chat.load_first": "Load a model first.",
        "chat.empty": "Write a message first.",
        "eval.file": "Eval config (YAML in the workspace)", "eval.config": "Eval config", "eval.run": "Run evaluation",
        "export.adapter": "Adapter folder", "export.out": "Output folder (in the workspace)",
        "export.run": "Merge and verify", "export.report": "Export report",
        "runs.refresh": "Refresh", "runs.name": "run", "runs.step": "step", "runs.loss": "loss",
        "runs.adapter": "adapter", "runs.compare": "Compare runs", "runs.no_samples": "No sample answers.",
        "runs.prompt": "Prompt", "runs.before": "before", "runs.after": "after",
    },
    "zh": {
        "app.title": "## loratune：微调、对话、评估、导出",
        "tab.train": "训练", "tab.data": "数据", "tab.chat": "对话", "tab.eval": "评估",
        "tab.export": "导出", "tab.runs": "运行记录",
        "train.load_from": "加载配置文件（工作区中的 YAML）", "train.load": "加载",
        "train.launch": "开始训练", "train.stop": "停止（保存检查点）", "train.resume": "继续训练",
        "train.job": "训练任务", "train.curve": "损失", "train.log": "日志", "train.yaml": "配置（YAML）",
        "train.download": "下载 YAML", "train.plan": "显存规划（loratune plan）",
        "train.no_job": "请先选择一个训练任务。", "train.stopping": "正在停止：正在保存检查点。",
        "train.not_running": "该任务未在运行。",
        "train.progress": "**{run}**：{status} · 第 {step} 步 · 损失 {loss}",
        "status.running": "运行中", "status.finished": "已完成", "status.stopped": "已停止（检查点已保存）",
        "status.failed": "失败", "status.ended": "已结束",
        "data.file": "数据集文件（工作区中）", "data.upload": "上传数据集文件",
        "data.model": "模型（使用其分词器和模板）", "data.format": "格式", "data.template": "对话模板",
        "data.samples_n": "显示的样本数", "data.preview": "预览", "data.rendered":
            "模型看到的样本（绿色：参与监督的词元）", "data.stats": "**统计**",
        "chat.base": "基础模型（未选择适配器时）", "chat.adapters": "适配器（已训练的运行）",
        "chat.load": "加载", "chat.system": "系统提示词", "chat.prompt": "你的消息", "chat.send": "发送",
        "chat.clear": "清空", "chat.loaded": "已加载：{names}", "chat.load_first": "请先加载模型。",
        "chat.empty": "请先输入消息。",
        "eval.file": "评估配置（工作区中的 YAML）", "eval.config": "评估配置", "eval.run": "运行评估",
        "export.adapter": "适配器文件夹", "export.out": "输出文件夹（工作区中）",
        "export.run": "合并并校验", "export.report": "导出报告",
        "runs.refresh": "刷新", "runs.name": "运行", "runs.step": "步数", "runs.loss": "损失",
        "runs.adapter": "适配器", "runs.compare": "对比运行", "runs.no_samples": "没有示例回答。",
        "runs.prompt": "提示", "runs.before": "训练前", "runs.after": "训练后",
    },
    "ru": {
        "app.title": "## loratune: дообучение, чат, оценка, экспорт",
        "tab.train": "Обучение", "tab.data": "Данные", "tab.chat": "Чат", "tab.eval": "Оценка",
        "tab.export": "Экспорт", "tab.runs": "Запуски",
        "train.load_from": "Загрузить конфигурацию (YAML из рабочей папки)", "train.load": "Загрузить",
        "train.launch": "Начать обучение", "train.stop": "Остановить (с сохранением контрольной точки)",
        "train.resume": "Продолжить",
        "train.job": "Запуск обучения", "train.curve": "Потери", "train.log": "Журнал",
        "train.yaml": "Конфигурация (YAML)", "train.download": "Скачать YAML",
        "train.plan": "План памяти (loratune plan)",
        "train.no_job": "Сначала выберите запуск обучения.",
        "train.stopping": "Остановка: сохраняется контрольная точка.",
        "train.not_running": "Этот запуск не выполняется.",
        "train.progress": "**{run}**: {status} · шаг {step} · потери {loss}",
        "status.running": "выполняется", "status.finished": "завершён",
        "status.stopped": "остановлен (контрольная точка сохранена)", "status.failed": "ошибка",
        "status.ended": "закончен",
        "data.file": "Файл набора данных (в рабочей папке)", "data.upload": "Загрузить файл набора данных",
        "data.model": "Модель (её токенизатор и шаблон)", "data.format": "Формат", "data.template": "Шаблон чата",
        "data.samples_n": "Сколько примеров показать", "data.preview": "Просмотр", "data.rendered":
            "Примеры так, как их видит модель (зелёным: обучаемые токены)", "data.stats": "**Статистика**",
        "chat.base": "Базовая модель (если адаптер не выбран)", "chat.adapters": "Адаптеры (обученные запуски)",
        "chat.load": "Загрузить", "chat.system": "Системный промпт", "chat.prompt": "Ваше сообщение",
        "chat.send": "Отправить", "chat.clear": "Очистить", "chat.loaded": "Загружено: {names}",
        "chat.load_first": "Сначала загрузите модель.", "chat.empty": "Сначала напишите сообщение.",
        "eval.file": "Конфигурация оценки (YAML из рабочей папки)", "eval.config": "Конфигурация оценки",
        "eval.run": "Запустить оценку",
        "export.adapter": "Папка адаптера", "export.out": "Папка результата (в рабочей папке)",
        "export.run": "Слить и проверить", "export.report": "Отчёт экспорта",
        "runs.refresh": "Обновить", "runs.name": "запуск", "runs.step": "шаг", "runs.loss": "потери",
        "runs.adapter": "адаптер", "runs.compare": "Сравнить запуски", "runs.no_samples": "Нет примеров ответов.",
        "runs.prompt": "Промпт", "runs.before": "до обучения", "runs.after": "после обучения",
    },
}


def t(key: str, lang: str = "en", **values: object) -> str:
    """The text of `key` in `lang` (English when the language is unknown), with `{placeholders}` filled."""
    table = CATALOGUE.get(lang, CATALOGUE["en"])
    text = table.get(key, CATALOGUE["en"].get(key, key))
    return text.format(**values) if values else text
