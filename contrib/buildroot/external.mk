include $(sort $(wildcard $(BR2_EXTERNAL_PETITKEXEC_PATH)/package/*/*.mk))
