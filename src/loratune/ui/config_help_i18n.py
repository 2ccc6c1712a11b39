"""Chinese and Russian texts of the Train form's config sections and of every config key's help.

English is the source: the schema's own help (`loratune.config`, what docs/config.md prints). These are
translations of it, shown under each field when the page is in that language. Key names, option values,
paths and code (everything between backticks, and names such as data.max_length) stay as they are in the
YAML and the docs. A key without a translation here falls back to the English help;
tests/ui/test_config_help_i18n.py names any schema key that lacks one, and checks that each translation
keeps every backticked token of the English text.
"""

from __future__ import annotations

SECTION_TITLES: dict[str, dict[str, str]] = {
    "en": {
        "model": "model: the base model", "quantization": "quantization: precision of the frozen base",
        "adapter": "adapter: LoRA settings", "data": "data: datasets and preparation",
        "train": "train: optimisation and checkpoints", "preference": "preference: DPO, KTO, ORPO, SimPO options",
        "output": "output: where results go",
    },
    "zh": {
        "model": "model：基础模型", "quantization": "quantization：冻结基座的精度",
        "adapter": "adapter：LoRA 设置", "data": "data：数据集与预处理",
        "train": "train：优化与检查点", "preference": "preference：DPO、KTO、ORPO、SimPO 选项",
        "output": "output：结果保存位置",
    },
    "ru": {
        "model": "model: базовая модель", "quantization": "quantization: точность замороженной базы",
        "adapter": "adapter: настройки LoRA", "data": "data: наборы данных и их подготовка",
        "train": "train: оптимизация и контрольные точки", "preference": "preference: параметры DPO, KTO, ORPO, SimPO",
        "output": "output: куда сохраняются результаты",
    },
}

HELP: dict[str, dict[str, str]] = {
    "zh": {
        "model.path": "基础模型：本地文件夹或 Hub ID（或内置的离线演示模型 `demo://llama`）。",
        "model.revision": "基础模型在 Hub 上的版本（分支、标签或提交）。",
        "model.tokenizer": "分词器文件夹或 Hub ID（若不使用模型自带的分词器）。",
        "model.add_tokens": "加入词表的词元（例如领域词汇）：嵌入和输出头扩展到新词表（新行取旧行的均值）并完整训练"
                            "（adapter.type lora 时作为 modules_to_save 保存在适配器中）；分词器随运行保存。通过 "
                            "transformers + peft 训练。loratune.model.new_tokens",
        "model.add_special_tokens": "以同样方式加入的特殊词元（不会被切分；解码回答时省略），例如新的对话标记。",
        "model.trust_remote_code": "运行模型附带的 Python 代码。默认关闭：只对你信任的模型开启。",
        "model.rope_scaling": "拉伸基座的 RoPE，以便在比预训练更长的序列上训练和运行，例如 `{type: yarn, factor: 4}`；"
                              "写入模型的配置（transformers 与 loratune 的解码器都会计算它），并由适配器的运行记录、"
                              "其导出以及按 data.max_length 个 token 规划的内存计划保留。仅适用于 RoPE 尚未缩放的基座。",
        "model.attn_implementation": "传给 transformers 的注意力内核；`auto` 让 transformers 选择该架构支持的最佳实现"
                                     "（大多数为 PyTorch SDPA，Gemma 2 为 eager，因为其软截断注意力没有 SDPA 实现）。",
        "model.kernels": "在 CUDA GPU 上，loratune 解码器中 loratune 自己的 Triton 内核（loratune.kernels）：4 位权重一次"
                         "完成反量化，RMSNorm 和 SwiGLU 每个方向一个内核，损失的交叉熵各行就地转换为其梯度。`auto`"
                         "（或 true）使用它们；false 改为运行它们的纯 PyTorch 参考实现（数学相同，较慢；用于核对数值）。"
                         "在 CPU 上无效。transformers + peft 回退路径始终按 transformers 和 peft 发布的原样运行，忽略此键。",
        "model.cuda_graphs": "在 CUDA GPU 上，将 loratune 解码器在其固定形状的无填充微批次上的前向和反向传播捕获一次为 "
                             "CUDA 图并重放（每次启动不经过 Python）：`auto`（或 true）在精确的情况下这样做（SFT、"
                             "train.batching 为 padding_free、bf16/fp32 计算、非确定性模式、无 NEFTune、无适配器 dropout）且实测比 "
                             "eager 更快时才使用；true 在有适配器 dropout 时也使用（掩码按微批次重新播种并重放；尚未在 GPU "
                             "上测量）；false 从不使用。transformers + peft 回退路径始终以 eager 方式运行。"
                             "参见 loratune.kernels.graphs。",
        "model.embedding_on_host": "在 CUDA GPU 上训练时，把 loratune 解码器冻结的输入嵌入保存在主机内存中（在 GPU 上测量之前默认 false）：每个微批次的"
                                   "行在主机上收集，并以非阻塞方式复制到 GPU（词表 128k、隐藏维度 4096、bf16 时约少占 1 GiB "
                                   "GPU 显存）。`auto` 在 CUDA 上、输出头未与嵌入绑定（绑定的输出头需要嵌入留在 GPU 上）且 "
                                   "train.strategy 不是 fsdp 时启用；true 在 CPU 上也启用（数值相同；用于测试），输出头绑定"
                                   "时报错；false 从不启用。内存计划把它计为主机内存。transformers + peft 回退路径忽略此键。"
                                   "loratune.decoder.model.TokenEmbedding",
        "model.implementation": "由哪套模型代码训练：`loratune` 是 loratune 自己的解码器（loratune.decoder：Llama、Mistral、"
                                "Qwen2/2.5/3、Gemma 1-3、Phi-3；在 4、16 或 32 位基座上的 LoRA 适配器），`transformers` 是 "
                                "transformers 模型加 peft 的适配器。`auto` 在 loratune 的解码器支持该架构和设置时使用它，否则使用 "
                                "transformers + peft（8 位基座、DoRA、modules_to_save、全量微调、其他架构）；运行开始时会用一行"
                                "说明选了哪一个。两种方式写出的都是同样的 PEFT 适配器。环境变量 LORATUNE_IMPLEMENTATION"
                                "（loratune 或 transformers）若已设置，则取代 `auto`（用于在任一路径上运行测试套件）。",
        "quantization.bits": "冻结基座的精度：4（QLoRA）、8（LLM.int8）、16（以 `compute_dtype` 进行普通 LoRA）或 32；"
                             "2 和 3 仅用于 quantization.method hqq。",
        "quantization.method": "2/4/8 位基座在加载时如何量化。`bitsandbytes`：NF4/FP4（QLoRA）或 LLM.int8。`hqq`：HQQ"
                               "（半二次量化，`hqq` 包：pip install 'loratune[hqq]'），2、3、4 或 8 位，每 "
                               "quantization.group_size 个权重为一组，纯 PyTorch 实现，CPU 上也可运行；它通过 transformers "
                               "+ peft 训练。quant_type 和 double_quant 仅适用于 bitsandbytes。",
        "quantization.group_size": "仅用于 HQQ：共享一个缩放因子和零点的一组权重的数量（越小越精确，占用字节越多）；"
                                   "必须整除每一层的输入维度。",
        "quantization.quant_type": "4 位数据类型；NF4 是 QLoRA 论文中的 NormalFloat。",
        "quantization.double_quant": "对量化常数也进行量化（每个权重约节省 0.37 位）。",
        "quantization.compute_dtype": "矩阵乘法和 16 位权重的数据类型。auto：在支持 bf16 的 GPU 上用 bf16（论文设置），"
                                      "较旧的 GPU 上用 fp16，CPU 上用 fp32。",
        "adapter.type": "`lora` 在冻结的基座上训练适配器；`none` 为全量微调（需要 bits 为 16 或 32）；`freeze` 为冻结微调："
                        "最后 adapter.freeze_layers 个解码层和 adapter.freeze_modules 完整训练，其余冻结（bits 16 或 32；"
                        "与 `none` 一样写出整个模型）。",
        "adapter.eva_rho": "adapter.init eva：秩的重新分配（peft 的 EvaConfig.rho，>= 1）：每层最多取 round(rank x rho) "
                           "个分量，总秩（rank x 适配层数）分给在各自层输入方差中解释比例最大的分量，因此各层秩不同"
                           "（有的层为零；alpha 随秩缩放；保存的适配器在 rank_pattern/alpha_pattern 中记录）。"
                           "1：每层保持 adapter.rank。",
        "adapter.freeze_layers": "adapter.type freeze：完整训练的解码层数（最后几层）。",
        "adapter.freeze_modules": "adapter.type freeze：按名称后缀额外完整训练的模块（例如 `embed_tokens`、`norm`、"
                                  "`lm_head`，或 `mlp` 表示每层的 MLP）。",
        "adapter.rank": "LoRA 秩 r（论文：64）。",
        "adapter.alpha": "LoRA alpha；更新按 alpha/r 缩放（使用 rslora 时为 alpha/sqrt(r)）。论文：16。",
        "adapter.dropout": "适配器输入上的 dropout（论文：13B 及以下为 0.1，33B 和 65B 为 0.05）。",
        "adapter.target_modules": "`all-linear`（除输出头外的所有线性层，从模型中自动查找）或模块名后缀的列表。",
        "adapter.exclude_modules": "永不加适配器的模块名后缀，在 target_modules 之后应用。",
        "adapter.rslora": "秩稳定 LoRA（rsLoRA）：按 alpha/sqrt(r) 而不是 alpha/r 缩放。",
        "adapter.dora": "权重分解 LoRA（DoRA）。",
        "adapter.modules_to_save": "完整训练并随适配器一起保存的模块（例如添加词元后的 `lm_head`）。",
        "adapter.init": "LoRA 权重的初始方式（loratune.model.lora_init）：`default`（A 为 Kaiming 均匀分布，B 为零："
                        "适配器起始时不起作用）、`gaussian`（A ~ N(0, 1/r)）、`pissa`（每个权重的前 r 个奇异方向移入适配器，"
                        "基座保留残差）、`pissa_niter_N`（同上，用 N 次迭代的随机 SVD，大权重更快）、`olora`（基于 QR），"
                        "这两者需要 16 或 32 位基座，保存的适配器被转换为原始基座上秩为 2r 的普通 LoRA；或在 4 位基座上用 "
                        "`loftq`（适配器从量化误差 W - Q(W) 的秩 r SVD 开始，W 从检查点的 safetensors 读取）；或在任何基座上用 "
                        "`eva`（A 取每层在前 32 个训练样本上输入的前 r 个主方向，B 为零）。",
        "data.datasets": "训练数据集，按各自的权重混合。",
        "data.eval_datasets": "留出的评估数据集（代替 eval_split）。",
        "data.eval_split": "从训练数据中留出这一比例（0 < x < 1）或这么多条样本（x >= 1）用于评估，按 train.seed 选取；"
                           "0 表示不留出。",
        "data.template": "对话模板：`auto`（分词器自带的模板；若分词器没有模板，当 chatml 的标记是词表中的词元时用 chatml，"
                         "否则用 guanaco 的纯文本标记）、内置名称（llama3、chatml、mistral、gemma、phi3、zephyr、plain、"
                         "alpaca、vicuna、guanaco），或 .jinja 文件的路径。",
        "data.template_variables": "对话模板读取的额外变量，与 `apply_chat_template(**kwargs)` 传入的方式相同（例如 Qwen3 的 "
                                   "`enable_thinking: false`，Llama 3.2 的 `date_string: 26 Jul 2024`，否则其模板会写入"
                                   "今天的日期）；随运行一起保存，chat 和 serve 也会使用。",
        "data.max_length": "一条训练序列（以及一个打包行）的截断长度，以词元计。",
        "data.source_max_length": "qlora.py 的 source_max_len：最多保留这么多提示词元（第一个训练词元之前的词元；保留最靠近"
                                  "回答的那些）；0：不单独限制。",
        "data.target_max_length": "qlora.py 的 target_max_len：从第一个训练词元起最多保留这么多词元（截去末尾）；0：不单独限制。",
        "data.truncation": "长于 max_length 的样本：`prompt_first` 先缩短提示（保留 BOS 和至少 max_length/4 的提示），"
                           "再截去末尾；`end` 截去末尾；`drop` 丢弃这些样本。会报告相应数量。",
        "data.train_on": "哪些词元参与损失计算：助手回合、全部词元，或最后一个助手回合。",
        "data.pack": "把多个样本打包进每行（最多 max_length 个词元）；注意力从不跨越样本。",
        "data.group_by_length": "不打包时的替代方案：把长度相近的样本放在同一批次（减少填充）。",
        "data.cache": "把分词后的数据集缓存到 $LORATUNE_CACHE/data，以文件内容、配置和分词器为键。",
        "data.num_proc": "渲染和分词大型数据集所用的进程数；0 自动选择，1 表示不使用多进程。",
        "data.streaming": "Hub 数据集：以流式读取记录，而不是先下载整个数据集（本地文件总是逐行读取）。",
        "train.method": "训练目标：`sft`（监督学习：对训练回合计算下一词元损失），或在“提示 + 被选回答 + 被拒回答”对上"
                        "的偏好方法：`dpo`（及其变体，见 preference.loss）、`orpo`、`simpo`；或在标注为可取或不可取的"
                        "补全上的 `kto`；或 `rm`，奖励模型（基座 + LoRA 上的标量头，成对损失，作为 reward_head.safetensors "
                        "保存在适配器旁边）。选项在 `preference` 部分。dpo 和 kto 的参考策略是禁用适配器后的基础模型"
                        "（不需要第二份副本）。损失在每个优化器步内按对（kto 按补全）归一化。",
        "train.epochs": "遍历训练数据的轮数（max_steps > 0 时忽略）。",
        "train.max_steps": "要运行的优化器步数；-1 表示运行 `epochs` 轮。",
        "train.batch_size": "train.batching 为 padded 时每个微批次的样本数。使用 padding_free 批处理（默认）时，它决定一个"
                            "优化器步训练多少样本（batch_size x grad_accum），并在 train.tokens_per_batch 为 auto 时决定"
                            "微批次的词元预算（batch_size x data.max_length）。`auto`：能放下的最大值，依据开始时打印的"
                            "内存规划（`loratune plan`）：在 GPU 上估计值保持在空闲显存的 90% 以下；在 CPU 上保持在可用内存"
                            "的 90% 以下，且最多为 8（更大的 CPU 批次不会带来更高的词元/秒）。恢复的运行沿用其检查点的批大小。",
        "train.grad_accum": "一个优化器步训练 batch_size x grad_accum 个样本（论文：有效批大小 16）。padded 批处理：每步累积的"
                            "微批次数。padding_free：该步的样本被切分为每个最多 train.tokens_per_batch 个词元的微批次，"
                            "因此一步运行的微批次数由词元数决定（通常少于 grad_accum）。",
        "train.devices": "一起训练的进程（GPU）数，数据并行。auto：启动器启动了多少就用多少（`torchrun --nproc-per-node N -m "
                         "loratune train ...` 或 `accelerate launch --multi_gpu --num_processes N -m loratune train ...`），"
                         "没有启动器时为 1。若填数字，必须等于启动的进程总数（world size）。每个进程负责该步索引列表中的 "
                         "grad_accum 个：一步训练 batch_size x grad_accum x devices 个样本，样本相同、顺序相同、归一化相同，"
                         "与 grad_accum x devices 的单进程运行一致。见 docs/multi-gpu.md",
        "train.strategy": "多个进程如何分担工作。`ddp`：每个进程持有（量化的）基座的完整副本，适配器的梯度每步做一次 "
                          "all-reduce。`fsdp`：FSDP2 将 4 位基座、适配器、梯度和优化器状态分片到各进程（loratune 的解码器，"
                          "train.method sft）。auto：若完整的 4 位副本加激活能放进一块 GPU（内存计划）则 ddp，否则 fsdp。"
                          "见 docs/multi-gpu.md",
        "train.fsdp_offload": "配合 train.strategy fsdp：每个进程的权重分片、其梯度和优化器状态保存在主机内存中"
                              "（PyTorch 的 CPUOffloadPolicy；优化器在 CPU 上更新）。占用更少 GPU 内存，步速更慢。",
        "train.batching": "一步的样本如何送入模型。无论哪种方式，一个优化器步都训练 batch_size x grad_accum 个样本"
                          "（有效批大小），顺序相同，损失按整步的监督词元归一化。`padding_free`：该步的样本首尾相接并"
                          "带有边界（注意力和标签从不跨越样本），组成每个最多 train.tokens_per_batch 个词元的微批次，因此"
                          "没有计算浪费在填充上。`padded`：每个微批次 batch_size 个样本，各自填充到最长样本的长度。",
        "train.tokens_per_batch": "仅用于无填充批处理：一个微批次的词元预算（按这么多词元规划其内存）。`auto`：batch_size x "
                                  "data.max_length，即它所替代的填充微批次的大小。至少为 data.max_length。它决定一步的样本"
                                  "如何切分为微批次（内存和速度），而不决定一步训练哪些样本（batch_size x grad_accum）。"
                                  "train.batching 为 padded 时忽略。",
        "train.lr": "峰值学习率（论文：7B 和 13B 为 2e-4，33B 和 65B 为 1e-4）。",
        "train.optimizer": "优化器；分页（paged）变体在内存紧张时把状态转移到主机内存（论文：分页 AdamW 32 位）。"
                           "全量微调（adapter.type none；除 badam 外也可用于 freeze）可用省内存的优化器，各来自其软件包"
                           "（`pip install 'loratune[optim]'`）：`galore_adamw`（GaLore：在每个注意力/MLP 权重梯度的 "
                           "train.optim_rank 秩 SVD 投影上运行 Adam）、`apollo_adamw`（APOLLO：随机投影上的 Adam 给出"
                           "梯度的逐通道缩放）、`adam_mini`（Adam-mini：每个注意力头或神经元一个二阶矩）、`badam`"
                           "（BAdam：每次只训练一个解码层，每 train.badam_switch_every 步换下一层）。loratune.train.memopt",
        "train.optim_rank": "galore_adamw、apollo_adamw：梯度投影的秩。",
        "train.optim_update_proj_gap": "galore_adamw、apollo_adamw：两次重新计算投影之间的步数（GaLore 论文：200）。",
        "train.optim_scale": "galore_adamw、apollo_adamw：投影更新的缩放；auto：GaLore 为 0.25（论文），APOLLO 为 1.0。",
        "train.optim_modules": "galore_adamw、apollo_adamw：位于这些名称模块内（参数点分名称中的一段）的二维权重被投影；"
                               "其余参数按普通 AdamW 更新。",
        "train.apollo_scale_type": "apollo_adamw：梯度缩放按通道（APOLLO）或按张量（APOLLO-Mini，配合 optim_rank 1）。",
        "train.badam_switch_every": "badam：切换所训练解码层之间的优化器步数。",
        "train.badam_switch_mode": "badam：各解码层轮流训练的顺序（descending：从最后一层开始）。",
        "train.weight_decay": "AdamW 权重衰减（从不作用于偏置和归一化层）。",
        "train.adam_beta2": "AdamW 的 beta2。",
        "train.scheduler": "预热之后的学习率调度（论文：constant）。",
        "train.warmup_ratio": "学习率从 0 开始预热所占的步数比例（论文：0.03）。",
        "train.warmup_steps": "以优化器步计的预热步数；大于 0 时取代 warmup_ratio。",
        "train.loraplus_ratio": "LoRA+：B 矩阵的学习率 = lr x 此比例（例如 16）；0 表示禁用。",
        "train.max_grad_norm": "梯度裁剪的范数（论文：0.3）；0 表示不裁剪。",
        "train.gradient_checkpointing": "非重入式激活检查点：true、false 或 auto（4 位和 8 位基座时开启）。",
        "train.seed": "权重初始化、数据顺序和 dropout 的随机种子。",
        "train.neftune_alpha": "NEFTune（Jain 等 2023；train.method sft）：仅在训练时向输入嵌入加入幅度为 "
                               "alpha/sqrt(L x hidden)（L：样本长度）的均匀噪声，评估、采样、chat 和 serve 时从不加入；"
                               "论文取 5。0 表示关闭。",
        "train.s2_attn": "移位稀疏注意力（S²-Attn，LongLoRA：Chen 等 2023），仅在训练时使用：每个样本在 "
                         "train.s2_attn_group 个 token 的分组内做注意力，其中一半注意力头的分组移位半个组（使信息在组间流动）；"
                         "评估、采样、chat 和 serve 使用完整注意力。减少长样本的注意力计算。需要 loratune 的解码器"
                         "（transformers 回退路径会拒绝）；以 eager 方式运行（不用 CUDA 图）。loratune.decoder.s2_attn",
        "train.s2_attn_group": "S²-Attn 的分组大小：每个样本长度的比例，取值 (0, 1]（LongLoRA：1/4），或不小于 2 的整数 "
                               "token 数；不长于其分组的样本使用普通因果注意力。",
        "train.log_every": "每 N 个优化器步记录一次指标。",
        "train.max_nonfinite": "连续这么多个优化器步因 NaN/inf 损失或梯度而被跳过后停止训练。",
        "train.eval_every": "每 N 个优化器步在评估集上计算一次损失；0：在每个检查点和结束时评估。需要 data.eval_split 或 "
                            "data.eval_datasets。",
        "train.early_stopping_patience": "连续这么多次评估都没有使最佳评估损失降低至少 early_stopping_min_delta 时停止；"
                                         "0 表示禁用早停。",
        "train.early_stopping_min_delta": "评估损失的最小下降量，达到才算改进。",
        "train.save_every": "每 N 个优化器步把可恢复的检查点保存到 output.dir/checkpoints（结束时也总会保存）；0：只在结束时保存。",
        "train.keep_last": "只保留最新的 N 个检查点（评估损失最佳的那个另外保留）；0 表示全部保留。",
        "train.resume": "`auto`（或 true）：从 output.dir 中未完成运行的最新完整检查点继续，否则重新开始；`off`（或 false）："
                        "总是重新开始；或者填写要继续的检查点（或运行文件夹）的路径。",
        "train.allow_config_change": "即使配置或训练数据与检查点中的不同也恢复训练（会打印差异）。",
        "train.deterministic": "只使用确定性算法（torch.use_deterministic_algorithms）：在 CPU 上，运行和恢复的运行得到逐位"
                               "相同的适配器；在 GPU 上更慢。",
        "train.tensorboard": "同时把 TensorBoard 日志写到 output.dir/tensorboard（需要 tensorboard 包）。",
        "train.report_to": "接收每一行 metrics.jsonl（相同步数，TensorBoard 的名称，如 `train/loss`）、配置以及结束时的"
                           "示例回答的跟踪器：`tensorboard`（同 train.tensorboard）、`wandb`（Weights & Biases；"
                           "WANDB_MODE=offline 时运行保存在 output.dir/wandb）、`mlflow`（MLFLOW_TRACKING_URI，否则为 "
                           "output.dir 中的本地存储）。wandb 和 mlflow 需要 `pip install 'loratune[trackers]'`；无法启动的"
                           "跟踪器只给出警告。loratune.train.trackers",
        "train.tracker_project": "train.report_to 的 wandb 项目和 MLflow 实验；运行以 output.dir 的文件夹名命名。",
        "train.plot": "在每次评估和结束时绘制 output.dir/loss.png（训练和评估损失）（需要 matplotlib）。",
        "train.eval_benchmark": "训练期间评分的多项选择基准，如 QLoRA 论文中对 MMLU（5-shot）所做的：其准确率写入 "
                                "metrics.jsonl、loss.png、摘要和模型卡。除非设置了 train.eval_benchmark.path，否则关闭；"
                                "其各个键见下方。",
        "preference.beta": "该方法的温度：`auto` 取论文默认值，DPO/IPO 0.1（Rafailov 等 2023；Azar 等 2023，即其 tau），"
                           "KTO 0.1（Ethayarajh 等 2024），ORPO 0.1（Hong 等 2024，即其 lambda），SimPO 2.0（Meng 等 2024）。",
        "preference.loss": "DPO 的损失（train.method 为 dpo 时）：`sigmoid` 即 DPO（label_smoothing > 0 时为保守 DPO），"
                           "`ipo` 即 IPO（对数比按词元取平均），`robust` 即鲁棒 DPO（Chowdhury 等 2024；label_smoothing "
                           "为假定的标签翻转率）。",
        "preference.label_smoothing": "假定一对样本的偏好被翻转的概率，取值于 [0, 0.5)：用于 cDPO/鲁棒 DPO 和 SimPO；0 表示无。",
        "preference.simpo_gamma": "SimPO 的目标奖励间隔 gamma（论文把 gamma/beta 调到 0.5 附近）。",
        "preference.reference": "dpo 和 kto 的参考对数概率：`adapter_disabled` 在每一步中计算（多一次不求梯度的前向，即关闭"
                                "适配器的基座）；`precomputed` 在训练前为每个样本计算一次（同一基座，保存在内存中，恢复运行时"
                                "重新计算），从而在之后的每一步省去这次前向。",
        "preference.desirable_weight": "KTO：可取补全的损失权重（论文：1.0；可取样本较少时调高，使 权重 x 数量 的比值保持在 "
                                       "1 到 4/3 之间）。",
        "preference.undesirable_weight": "KTO：不可取补全的损失权重（论文：1.0）。",
        "output.dir": "输出文件夹：适配器、分词器、解析后的配置、指标。",
        "output.overwrite": "允许写入非空的输出文件夹。",
        "output.sample_prompts": "在训练开始前和结束后回答的提示（贪心解码，使用训练时的对话模板），用于展示变化；会打印并写入 "
                                 "output.dir/samples.json。恢复的运行保留其最初的回答。",
        "output.sample_max_new_tokens": "每个示例提示生成的新词元数。",
        "output.adapter": "结束时写入 output.dir 的权重：最后一步的权重，或评估损失最低的检查点（此时每次评估有改进时也会"
                          "保存一个检查点）。",
    },
    "ru": {
        "model.path": "Базовая модель: локальная папка или идентификатор в хабе (или `demo://llama` — встроенная "
                      "офлайн-демомодель).",
        "model.revision": "Ревизия базовой модели в хабе (ветка, тег или коммит).",
        "model.tokenizer": "Папка токенизатора или его идентификатор в хабе, если используется не собственный токенизатор "
                           "модели.",
        "model.add_tokens": "Токены, добавляемые в словарь (например, термины предметной области): эмбеддинги и выходная "
                            "голова расширяются до нового словаря (новые строки — среднее старых) и обучаются полностью "
                            "(при adapter.type lora сохраняются в адаптере как modules_to_save); токенизатор сохраняется "
                            "вместе с запуском. Обучается через transformers + peft. loratune.model.new_tokens",
        "model.add_special_tokens": "Специальные токены, добавляемые так же (не разбиваются; опускаются в "
                                    "декодированных ответах), например новые маркеры чата.",
        "model.trust_remote_code": "Выполнять код на Python, поставляемый с моделью. По умолчанию выключено: включайте "
                                   "только для моделей, которым доверяете.",
        "model.rope_scaling": "Растянуть RoPE базы, чтобы обучать и запускать её на последовательностях длиннее, чем при "
                              "предобучении, например `{type: yarn, factor: 4}`; записывается в конфигурацию модели "
                              "(её вычисляют и transformers, и декодер loratune) и сохраняется в запуске адаптера, его "
                              "экспортах и плане памяти, который рассчитан на data.max_length токенов. Только для базы, "
                              "чья RoPE ещё не масштабирована.",
        "model.attn_implementation": "Ядро внимания, передаваемое в transformers; `auto` позволяет transformers выбрать "
                                     "лучшее из поддерживаемых архитектурой (PyTorch SDPA для большинства, eager для "
                                     "Gemma 2, у которой для внимания с мягким ограничением нет пути SDPA).",
        "model.kernels": "Собственные Triton-ядра loratune в декодере loratune на GPU CUDA (loratune.kernels): 4-битные "
                         "веса деквантуются за один проход, RMSNorm и SwiGLU — одно ядро на каждое направление, строки "
                         "перекрёстной энтропии функции потерь на месте превращаются в свой градиент. `auto` (или true) "
                         "использует их; false вместо них запускает их эталонные реализации на чистом PyTorch (та же "
                         "математика, медленнее; для проверки чисел). На CPU не действует. Запасной путь transformers + "
                         "peft всегда работает так, как поставляются transformers и peft, и игнорирует этот ключ.",
        "model.cuda_graphs": "На GPU CUDA один раз записать прямой и обратный проход декодера loratune на его микропакетах "
                             "без паддинга фиксированной формы как граф CUDA и затем воспроизводить его (без Python при "
                             "каждом запуске): `auto` (или true) делает это там, где это точно (SFT, train.batching "
                             "padding_free, вычисления в bf16/fp32, не детерминированный режим, без NEFTune, без dropout адаптера) и "
                             "по измерению быстрее eager; true — также с dropout адаптера (маски пересеиваются на каждый "
                             "микропакет и воспроизводятся; на GPU ещё не измерено); false — никогда. Запасной путь transformers + peft всегда работает "
                             "eager. См. loratune.kernels.graphs.",
        "model.embedding_on_host": "Держать замороженное входное embedding-представление декодера loratune в памяти "
                                   "хоста при обучении на GPU CUDA (по умолчанию false, пока не измерено на GPU): строки каждого микропакета собираются на хосте и "
                                   "копируются на GPU без блокировки (примерно на 1 GiB меньше памяти GPU для словаря "
                                   "128k при скрытом размере 4096 в bf16). `auto` делает это на CUDA, когда выходная "
                                   "голова не связана с embedding (связанной голове оно нужно на GPU) и train.strategy "
                                   "не fsdp; true — также на CPU (те же числа; для тестов), ошибка для связанной головы; "
                                   "false — никогда. План памяти считает его памятью хоста. Запасной путь transformers "
                                   "+ peft игнорирует этот ключ. loratune.decoder.model.TokenEmbedding",
        "model.implementation": "Какой код модели обучает: `loratune` — собственный декодер loratune (loratune.decoder: "
                                "Llama, Mistral, Qwen2/2.5/3, Gemma 1-3, Phi-3; адаптеры LoRA на 4-, 16- или 32-битной "
                                "базе), `transformers` — модель transformers с адаптерами peft. `auto` берёт декодер "
                                "loratune, где он поддерживает архитектуру и настройки, и transformers + peft в остальных "
                                "случаях (8-битные базы, DoRA, modules_to_save, полное дообучение, другие архитектуры); в "
                                "начале запуска одной строкой сообщается, что выбрано. Записывается в любом случае один и "
                                "тот же адаптер PEFT. Переменная окружения LORATUNE_IMPLEMENTATION (loratune или "
                                "transformers), если задана, заменяет `auto` (чтобы прогнать набор тестов на любом из путей).",
        "quantization.bits": "Точность замороженной базы: 4 (QLoRA), 8 (LLM.int8), 16 (обычная LoRA в `compute_dtype`) "
                             "или 32; 2 и 3 только с quantization.method hqq.",
        "quantization.method": "Как квантуется 2/4/8-битная база при загрузке. `bitsandbytes`: NF4/FP4 (QLoRA) или "
                               "LLM.int8. `hqq`: HQQ (полуквадратичное квантование, пакет `hqq`: pip install "
                               "'loratune[hqq]'), 2, 3, 4 или 8 бит группами по quantization.group_size весов, на чистом "
                               "PyTorch, в том числе на CPU; обучается через transformers + peft. quant_type и "
                               "double_quant относятся только к bitsandbytes.",
        "quantization.group_size": "Только для HQQ: число весов в группе с общим масштабом и нулевой точкой (меньше — "
                                   "точнее, но больше байт); должно делить входную размерность каждого слоя.",
        "quantization.quant_type": "Тип данных для 4 бит; NF4 — это NormalFloat из статьи о QLoRA.",
        "quantization.double_quant": "Квантовать также и константы квантования (экономит около 0,37 бита на вес).",
        "quantization.compute_dtype": "Тип данных матричных умножений и 16-битных весов. auto: bf16 на GPU, который его "
                                      "поддерживает (как в статье), fp16 на более старых GPU, fp32 на CPU.",
        "adapter.type": "`lora` обучает адаптеры на замороженной базе; `none` — полное дообучение (нужны bits 16 или 32); "
                        "`freeze` — обучение с заморозкой: последние adapter.freeze_layers слоёв декодера и "
                        "adapter.freeze_modules обучаются полностью, остальное заморожено (bits 16 или 32; записывается вся "
                        "модель, как при `none`).",
        "adapter.eva_rho": "adapter.init eva: перераспределение рангов (EvaConfig.rho из peft, >= 1): каждый слой "
                           "может взять до round(rank x rho) компонент, а суммарный ранг (rank x число адаптированных "
                           "слоёв) достаётся компонентам, объясняющим наибольшую долю дисперсии входов своего слоя, "
                           "поэтому ранги слоёв различаются (у некоторых нулевые; alpha масштабируется вместе с "
                           "рангом; сохранённый адаптер указывает это в rank_pattern/alpha_pattern). 1: каждый слой "
                           "сохраняет adapter.rank.",
        "adapter.freeze_layers": "adapter.type freeze: сколько слоёв декодера (последних) обучаются полностью.",
        "adapter.freeze_modules": "adapter.type freeze: дополнительные модули, обучаемые полностью, по суффиксу имени "
                                  "(например, `embed_tokens`, `norm`, `lm_head` или `mlp` для MLP каждого слоя).",
        "adapter.rank": "Ранг LoRA r (в статье: 64).",
        "adapter.alpha": "Alpha LoRA; обновление масштабируется на alpha/r (или alpha/sqrt(r) с rslora). В статье: 16.",
        "adapter.dropout": "Dropout на входе адаптера (в статье: 0.1 до 13B, 0.05 для 33B и 65B).",
        "adapter.target_modules": "`all-linear` (все линейные слои, кроме выходной головы, найденные по модели) или "
                                  "список суффиксов имён модулей.",
        "adapter.exclude_modules": "Суффиксы имён модулей, которые никогда не адаптируются; применяются после "
                                   "target_modules.",
        "adapter.rslora": "LoRA со стабилизацией по рангу (rsLoRA): масштаб alpha/sqrt(r) вместо alpha/r.",
        "adapter.dora": "LoRA с декомпозицией весов (DoRA).",
        "adapter.modules_to_save": "Модули, обучаемые полностью и сохраняемые вместе с адаптером (например, `lm_head` "
                                   "после добавления токенов).",
        "adapter.init": "Начальные значения весов LoRA (loratune.model.lora_init): `default` (A по Каймингу, B ноль: "
                        "адаптер вначале ничего не меняет), `gaussian` (A ~ N(0, 1/r)), `pissa` (верхние r сингулярных "
                        "направлений каждого веса переходят в адаптер, в базе остаётся остаток), `pissa_niter_N` (то же "
                        "через рандомизированное SVD из N итераций, быстрее на больших весах), `olora` (на основе QR); "
                        "эти два требуют базу 16 или 32 бита, а сохранённый адаптер преобразуется в обычный LoRA ранга 2r "
                        "на исходной базе; или `loftq` на 4-битной базе (адаптер начинается с SVD ранга r ошибки "
                        "квантования W - Q(W), W читается из safetensors чекпойнта); или `eva` на любой базе (A — "
                        "верхние r главных направлений входов каждого слоя на первых 32 обучающих образцах, B ноль).",
        "data.datasets": "Обучающие наборы данных, смешиваемые согласно их весам.",
        "data.eval_datasets": "Отложенные наборы данных для оценки (вместо eval_split).",
        "data.eval_split": "Отложить для оценки эту долю (0 < x < 1) или это число примеров (x >= 1) обучающих данных, "
                           "выбранных с train.seed; 0 — не откладывать.",
        "data.template": "Шаблон чата: `auto` (собственный шаблон токенизатора; для токенизатора без шаблона — chatml, "
                         "если его маркеры являются токенами словаря, иначе текстовые маркеры guanaco), встроенное имя "
                         "(llama3, chatml, mistral, gemma, phi3, zephyr, plain, alpaca, vicuna, guanaco) или путь к "
                         "файлу .jinja.",
        "data.template_variables": "Дополнительные переменные, которые читает шаблон чата, в том виде, как их передаёт "
                                   "`apply_chat_template(**kwargs)` (например, `enable_thinking: false` для Qwen3, "
                                   "`date_string: 26 Jul 2024` для Llama 3.2, шаблон которой иначе пишет сегодняшнюю "
                                   "дату); сохраняются вместе с запуском и используются также в chat и serve.",
        "data.max_length": "Предельная длина одной обучающей последовательности (и упакованной строки) в токенах.",
        "data.source_max_length": "source_max_len из qlora.py: оставлять не более этого числа токенов запроса (тех, что "
                                  "до первого обучаемого токена; сохраняются ближайшие к ответу); 0 — без отдельного "
                                  "ограничения.",
        "data.target_max_length": "target_max_len из qlora.py: оставлять не более этого числа токенов начиная с первого "
                                  "обучаемого токена (конец обрезается); 0 — без отдельного ограничения.",
        "data.truncation": "Примеры длиннее max_length: `prompt_first` укорачивает запрос (сохраняя BOS и не меньше "
                           "max_length/4 запроса), затем обрезает конец; `end` обрезает конец; `drop` отбрасывает такие "
                           "примеры. Их количество сообщается.",
        "data.train_on": "Какие токены участвуют в функции потерь: реплики ассистента, все токены или последняя реплика "
                         "ассистента.",
        "data.pack": "Упаковывать несколько примеров в каждую строку длиной до max_length токенов; внимание никогда не "
                     "пересекает границы примеров.",
        "data.group_by_length": "Альтернатива упаковке без неё: объединять в пакет примеры близкой длины (меньше "
                                "паддинга).",
        "data.cache": "Кэшировать токенизированные наборы данных в $LORATUNE_CACHE/data с ключом по содержимому файлов, "
                      "конфигурации и токенизатору.",
        "data.num_proc": "Число процессов для рендеринга и токенизации больших наборов данных; 0 — выбрать "
                         "автоматически, 1 — отключить.",
        "data.streaming": "Наборы данных из хаба: читать записи потоком, не скачивая сначала весь набор (локальные "
                          "файлы всегда читаются построчно).",
        "train.method": "Цель обучения: `sft` (обучение с учителем: потери предсказания следующего токена на обучаемых "
                        "репликах) или метод предпочтений на парах «запрос, выбранный ответ, отвергнутый ответ»: `dpo` "
                        "(с вариантами, см. preference.loss), `orpo`, `simpo`; или `kto` на ответах, размеченных как "
                        "желательные или нет; или `rm` — модель вознаграждения (скалярная голова на базе + LoRA, "
                        "попарная функция потерь, сохраняется рядом с адаптером как reward_head.safetensors). Параметры — "
                        "в разделе `preference`. Эталонная политика dpo и kto — базовая модель с отключённым адаптером "
                        "(без второй копии). Потери нормируются на пару (для kto — на ответ) в пределах каждого шага "
                        "оптимизатора.",
        "train.epochs": "Число проходов по обучающим данным (игнорируется, если max_steps > 0).",
        "train.max_steps": "Число шагов оптимизатора; -1 — выполнить `epochs` эпох.",
        "train.batch_size": "Примеров в микропакете при train.batching padded. При пакетировании padding_free (по "
                            "умолчанию) задаёт, на скольких примерах обучается шаг оптимизатора (batch_size x "
                            "grad_accum), а при train.tokens_per_batch auto — бюджет токенов микропакета (batch_size x "
                            "data.max_length). `auto`: наибольшее значение, которое помещается, по плану памяти, "
                            "печатаемому в начале (`loratune plan`): на GPU оценка остаётся ниже 90% свободной памяти; "
                            "на CPU — ниже 90% доступной RAM, не более 8 (большие пакеты на CPU не дают больше "
                            "токенов/с). Возобновлённый запуск сохраняет размер пакета из своей контрольной точки.",
        "train.grad_accum": "Шаг оптимизатора обучается на batch_size x grad_accum примерах (в статье: эффективный "
                            "пакет 16). Пакетирование с паддингом: число микропакетов, накапливаемых за шаг. Без "
                            "паддинга: примеры шага нарезаются на микропакеты не более чем по train.tokens_per_batch "
                            "токенов, так что шаг выполняет столько микропакетов, сколько требуют их токены (часто "
                            "меньше grad_accum).",
        "train.devices": "Процессы (GPU), обучающиеся вместе, параллелизм по данным. auto: столько, сколько запустил "
                         "лаунчер (`torchrun --nproc-per-node N -m loratune train ...` или `accelerate launch "
                         "--multi_gpu --num_processes N -m loratune train ...`), 1 без него. Число должно совпадать с "
                         "размером запущенной группы процессов (world size). Каждый процесс берёт grad_accum списков "
                         "индексов шага: шаг обучается на batch_size x grad_accum x devices примерах — тех же, в том же "
                         "порядке и с той же нормировкой, что и один процесс с grad_accum x devices. docs/multi-gpu.md",
        "train.strategy": "Как несколько процессов делят работу. `ddp`: каждый держит полную копию (квантованной) "
                          "базы, градиенты адаптеров суммируются all-reduce один раз за шаг. `fsdp`: FSDP2 шардирует веса "
                          "4-битной базы, адаптеров, градиентов и состояний оптимизатора по процессам (декодер loratune, "
                          "train.method sft). auto: ddp, если полная 4-битная копия и активации помещаются на один GPU "
                          "(план памяти), иначе fsdp. docs/multi-gpu.md",
        "train.fsdp_offload": "С train.strategy fsdp: шарды весов каждого процесса, их градиенты и состояния "
                              "оптимизатора хранятся в памяти хоста (CPUOffloadPolicy из PyTorch; оптимизатор шагает на "
                              "CPU). Меньше памяти GPU, шаги медленнее.",
        "train.batching": "Как примеры шага попадают в модель. В обоих случаях шаг оптимизатора обучается на "
                          "batch_size x grad_accum примерах (эффективный пакет), в том же порядке, с потерями, "
                          "нормированными на обучаемый токен по всему шагу. `padding_free`: примеры шага выкладываются "
                          "подряд с сохранением границ (внимание и метки никогда не пересекают примеры) в микропакеты "
                          "не более чем по train.tokens_per_batch токенов, так что вычисления не тратятся на паддинг. "
                          "`padded`: микропакеты по batch_size примеров, каждый дополнен до самого длинного.",
        "train.tokens_per_batch": "Только для пакетирования без паддинга: бюджет токенов одного микропакета (его "
                                  "память планируется на столько токенов). `auto`: batch_size x data.max_length, размер "
                                  "заменяемого им микропакета с паддингом. Не меньше data.max_length. Определяет, как "
                                  "примеры шага нарезаются на микропакеты (память и скорость), но не то, на каких "
                                  "примерах обучается шаг (batch_size x grad_accum). Игнорируется при train.batching "
                                  "padded.",
        "train.lr": "Пиковая скорость обучения (в статье: 2e-4 для 7B и 13B, 1e-4 для 33B и 65B).",
        "train.optimizer": "Оптимизатор; страничные (paged) варианты выгружают состояние в память хоста при нехватке "
                           "памяти (в статье: paged AdamW 32-bit). Для полного дообучения (adapter.type none; кроме "
                           "badam — и freeze) — экономные по памяти, каждый из своего пакета (`pip install "
                           "'loratune[optim]'`): `galore_adamw` (GaLore: Adam на SVD-проекции ранга train.optim_rank "
                           "градиента каждого веса внимания/MLP), `apollo_adamw` (APOLLO: Adam случайной проекции задаёт "
                           "градиенту масштаб по каналам), `adam_mini` (Adam-mini: один второй момент на голову или "
                           "нейрон), `badam` (BAdam: обучается один слой декодера за раз, следующий — каждые "
                           "train.badam_switch_every шагов). loratune.train.memopt",
        "train.optim_rank": "galore_adamw, apollo_adamw: ранг проекции градиента.",
        "train.optim_update_proj_gap": "galore_adamw, apollo_adamw: шагов между пересчётами проекции (в статье GaLore: "
                                       "200).",
        "train.optim_scale": "galore_adamw, apollo_adamw: масштаб проецированного обновления; auto: 0.25 для GaLore "
                             "(статья), 1.0 для APOLLO.",
        "train.optim_modules": "galore_adamw, apollo_adamw: проецируются двумерные веса внутри модулей с этими именами "
                               "(часть имени параметра через точку); остальные параметры шагают как обычный AdamW.",
        "train.apollo_scale_type": "apollo_adamw: один масштаб градиента на канал (APOLLO) или на тензор (APOLLO-Mini, "
                                   "с optim_rank 1).",
        "train.badam_switch_every": "badam: шагов оптимизатора между сменами обучаемого слоя декодера.",
        "train.badam_switch_mode": "badam: порядок, в котором слои декодера обучаются по очереди (descending: с "
                                   "последнего слоя).",
        "train.weight_decay": "Затухание весов AdamW (никогда не применяется к смещениям и нормализациям).",
        "train.adam_beta2": "Параметр beta2 оптимизатора AdamW.",
        "train.scheduler": "Расписание скорости обучения после разогрева (в статье: constant).",
        "train.warmup_ratio": "Доля шагов, за которые скорость обучения разогревается от 0 (в статье: 0.03).",
        "train.warmup_steps": "Разогрев в шагах оптимизатора; если > 0, заменяет warmup_ratio.",
        "train.loraplus_ratio": "LoRA+: скорость обучения матриц B = lr x этот коэффициент (например, 16); 0 — "
                                "отключено.",
        "train.max_grad_norm": "Норма отсечения градиента (в статье: 0.3); 0 отключает отсечение.",
        "train.gradient_checkpointing": "Нереентерабельные контрольные точки активаций: true, false или auto (включены "
                                        "для 4- и 8-битных баз).",
        "train.seed": "Сид для инициализации весов, порядка данных и dropout.",
        "train.neftune_alpha": "NEFTune (Jain et al. 2023; train.method sft): равномерный шум величины "
                               "alpha/sqrt(L x hidden) (L: длина образца) на входных эмбеддингах только при обучении, "
                               "никогда при оценке, генерации примеров, chat и serve; в статье 5. 0 отключает.",
        "train.s2_attn": "Сдвинутое разреженное внимание (S²-Attn, LongLoRA: Chen et al. 2023) только при обучении: "
                         "каждый образец применяет внимание внутри групп по train.s2_attn_group токенов, половина голов "
                         "видит группы, сдвинутые на полгруппы (так информация переходит между группами); оценка, "
                         "генерация примеров, chat и serve используют полное внимание. Сокращает работу внимания на "
                         "длинных образцах. Нужен декодер loratune (на запасном пути transformers отклоняется); "
                         "выполняется без CUDA-графов. loratune.decoder.s2_attn",
        "train.s2_attn_group": "Размер группы S²-Attn: доля длины каждого образца в (0, 1] (LongLoRA: 1/4) или целое "
                               "число токенов >= 2; образец не длиннее своей группы использует обычное причинное внимание.",
        "train.log_every": "Записывать метрики каждые N шагов оптимизатора.",
        "train.max_nonfinite": "Остановиться после стольких подряд шагов оптимизатора, пропущенных из-за NaN/inf в "
                               "потерях или градиенте.",
        "train.eval_every": "Вычислять потери на отложенной выборке каждые N шагов оптимизатора; 0 — в каждой "
                            "контрольной точке и в конце. Нужен data.eval_split или data.eval_datasets.",
        "train.early_stopping_patience": "Остановиться после стольких подряд оценок, не снизивших лучшие потери на "
                                         "оценке на early_stopping_min_delta; 0 отключает раннюю остановку.",
        "train.early_stopping_min_delta": "Наименьшее снижение потерь на оценке, которое считается улучшением.",
        "train.save_every": "Сохранять возобновляемую контрольную точку в output.dir/checkpoints каждые N шагов "
                            "оптимизатора (и всегда в конце); 0 — только в конце.",
        "train.keep_last": "Хранить только N последних контрольных точек (точка с лучшими потерями на оценке хранится "
                           "дополнительно); 0 — хранить все.",
        "train.resume": "`auto` (или true): продолжить незавершённый запуск в output.dir с его последней полной "
                        "контрольной точки, иначе начать заново; `off` (или false): всегда начинать заново; или путь к "
                        "контрольной точке (или к папке запуска), с которой продолжить.",
        "train.allow_config_change": "Возобновлять, даже если конфигурация или обучающие данные отличаются от "
                                     "сохранённых в контрольной точке (различия печатаются).",
        "train.deterministic": "Использовать только детерминированные алгоритмы (torch.use_deterministic_algorithms): "
                               "запуски и возобновлённые запуски дают побитово одинаковые адаптеры на CPU; на GPU "
                               "медленнее.",
        "train.tensorboard": "Также писать журналы TensorBoard в output.dir/tensorboard (нужен пакет tensorboard).",
        "train.report_to": "Трекеры, получающие каждую строку metrics.jsonl (те же шаги, имена TensorBoard, например "
                           "`train/loss`), конфигурацию и в конце ответы на примерные запросы: `tensorboard` (как "
                           "train.tensorboard), `wandb` (Weights & Biases; при WANDB_MODE=offline запуск хранится в "
                           "output.dir/wandb), `mlflow` (MLFLOW_TRACKING_URI, иначе локальное хранилище в output.dir). "
                           "Для wandb и mlflow нужен `pip install 'loratune[trackers]'`; трекер, который не может "
                           "запуститься, даёт лишь предупреждение. loratune.train.trackers",
        "train.tracker_project": "Проект wandb и эксперимент MLflow для train.report_to; запуск называется по имени "
                                 "папки output.dir.",
        "train.plot": "Рисовать output.dir/loss.png (потери на обучении и оценке) при каждой оценке и в конце (нужен "
                      "matplotlib).",
        "train.eval_benchmark": "Тест с выбором ответа, оцениваемый во время обучения, как в статье о QLoRA с MMLU "
                                "(5-shot): его точность записывается в metrics.jsonl, loss.png, сводку и карточку модели. "
                                "Выключен, пока не задан train.eval_benchmark.path; его ключи — ниже.",
        "preference.beta": "Температура метода: `auto` берёт значение по умолчанию из статьи: DPO/IPO 0.1 (Rafailov и "
                           "др. 2023; Azar и др. 2023, их tau), KTO 0.1 (Ethayarajh и др. 2024), ORPO 0.1 (Hong и др. "
                           "2024, их lambda), SimPO 2.0 (Meng и др. 2024).",
        "preference.loss": "Функция потерь DPO (train.method dpo): `sigmoid` — DPO (консервативный DPO при "
                           "label_smoothing > 0), `ipo` — IPO (логарифмы отношений усредняются по токенам), `robust` — "
                           "робастный DPO (Chowdhury и др. 2024; label_smoothing — предполагаемая доля перевёрнутых "
                           "меток).",
        "preference.label_smoothing": "Предполагаемая вероятность того, что предпочтение в паре перевёрнуто, в [0, 0.5): "
                                      "cDPO/робастный DPO и SimPO; 0 — нет.",
        "preference.simpo_gamma": "Целевой отступ вознаграждения gamma в SimPO (в статье gamma/beta подбирается около "
                                  "0.5).",
        "preference.reference": "Эталонные логарифмы вероятностей для dpo и kto: `adapter_disabled` вычисляет их на "
                                "каждом шаге (ещё один прямой проход без градиента — база с выключенным адаптером); "
                                "`precomputed` вычисляет их один раз для каждого примера перед обучением (та же база, "
                                "хранится в памяти, пересчитывается при возобновлении запуска), экономя этот проход на "
                                "каждом последующем шаге.",
        "preference.desirable_weight": "KTO: вес потерь желательных ответов (в статье: 1.0; увеличьте его, если "
                                       "желательные примеры встречаются реже, так чтобы отношение вес x количество "
                                       "оставалось в пределах от 1 до 4/3).",
        "preference.undesirable_weight": "KTO: вес потерь нежелательных ответов (в статье: 1.0).",
        "output.dir": "Папка результатов: адаптер, токенизатор, итоговая конфигурация, метрики.",
        "output.overwrite": "Разрешить запись в непустую папку результатов.",
        "output.sample_prompts": "Запросы, на которые модель отвечает (жадно, с шаблоном чата обучения) до начала и "
                                 "после окончания обучения, чтобы показать, что изменилось; ответы печатаются и "
                                 "записываются в output.dir/samples.json. Возобновлённый запуск сохраняет свои первые "
                                 "ответы.",
        "output.sample_max_new_tokens": "Число новых токенов, генерируемых на каждый пробный запрос.",
        "output.adapter": "Веса, записываемые в output.dir в конце: веса последнего шага или контрольной точки с "
                          "наименьшими потерями на оценке (тогда контрольная точка сохраняется также при каждой "
                          "оценке, которая их улучшает).",
    },
}


def section_title(section: str, lang: str) -> str:
    """The accordion title of a config section in `lang` (the section's name where there is no text)."""
    return SECTION_TITLES.get(lang, {}).get(section) or SECTION_TITLES["en"].get(section, section)


def help_text(key: str, english: str, lang: str) -> str:
    """The help of config key `key` in `lang`; the schema's English text for `en` or a missing translation."""
    return HELP.get(lang, {}).get(key) or english
