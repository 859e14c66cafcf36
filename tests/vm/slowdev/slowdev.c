// SPDX-License-Identifier: GPL-2.0
/*
 * petitkexec_slowdev: a slow PCI driver, for petitkexec's real-kernel tests only.
 *
 * Binds QEMU's "edu" device (1234:11e8) and takes as long to let go of it as the field's slow
 * devices do, so a test can show what tearing down side by side gains over the kernel's
 * serial device_shutdown() (drivers/base/core.c walks devices_kset in reverse and calls each
 * bound driver's ->shutdown one after the other; pci_device_shutdown() is PCI's).
 *
 * Parameters (all per module, read when the callback runs):
 *   remove_ms     how long remove() takes (unbind, what petitkexec does to each function)
 *   shutdown_ms   how long shutdown() takes (what plain `kexec -e` makes each bound driver do)
 *   hang_remove   a PCI address (0000:00:0c.0) whose remove() does not return while it is
 *                 set (writable at run time: writing "" lets the stuck remove() return, so
 *                 a test can power its guest off; the kernel's own shutdown would wait on
 *                 the device lock for ever otherwise)
 *   sloppy_remove a PCI address whose remove() leaves bus mastering on
 */
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/pci.h>

static unsigned int remove_ms = 2000;
module_param(remove_ms, uint, 0644);
MODULE_PARM_DESC(remove_ms, "milliseconds remove() takes");

static unsigned int shutdown_ms = 2000;
module_param(shutdown_ms, uint, 0644);
MODULE_PARM_DESC(shutdown_ms, "milliseconds shutdown() takes");

static char hang_remove[16];
module_param_string(hang_remove, hang_remove, sizeof(hang_remove), 0644);
MODULE_PARM_DESC(hang_remove, "PCI address whose remove() waits while this is set");

static char sloppy_remove[16];
module_param_string(sloppy_remove, sloppy_remove, sizeof(sloppy_remove), 0644);
MODULE_PARM_DESC(sloppy_remove, "PCI address whose remove() leaves bus mastering on");

static bool is(struct pci_dev *pdev, const char *address)
{
	return address[0] && !strcmp(pci_name(pdev), address);
}

/* Like any DMA-capable driver's probe: enable the function and turn bus mastering on. */
static int slowdev_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	int err = pci_enable_device(pdev);

	if (err)
		return err;
	pci_set_master(pdev);
	dev_info(&pdev->dev, "slowdev bound (remove %u ms, shutdown %u ms)\n", remove_ms,
		 shutdown_ms);
	return 0;
}

/*
 * Stands for NVMe's nvme_remove() → nvme_dev_disable(dev, true): the controller's shutdown
 * (CC.SHN, then waiting up to its RTD3E/shutdown timeout for CSTS.SHST) runs on unbind too,
 * so remove takes the controller's shutdown time (about 4.5 s on many datacenter drives).
 * hang_remove stands for a driver waiting forever on hardware that never answers (the unbind
 * write blocks in D state with the device lock held); sloppy_remove for a driver that frees
 * its state but never calls pci_disable_device()/pci_clear_master(), so the function may
 * still DMA after unbind.
 */
static void slowdev_remove(struct pci_dev *pdev)
{
	if (is(pdev, hang_remove)) {
		dev_info(&pdev->dev, "slowdev remove: hanging until hang_remove is cleared\n");
		/* Unlocked read of a test knob: a stale value only costs one more second. */
		while (is(pdev, hang_remove))
			ssleep(1);
	}
	msleep(remove_ms);
	if (is(pdev, sloppy_remove)) {
		dev_info(&pdev->dev, "slowdev remove: leaving bus mastering on\n");
		return;
	}
	pci_clear_master(pdev);
	pci_disable_device(pdev);
	dev_info(&pdev->dev, "slowdev removed after %u ms\n", remove_ms);
}

/*
 * Stands for NVMe's nvme_shutdown() → nvme_disable_prepare_reset(dev, true) →
 * nvme_dev_disable(dev, true): the same controller shutdown as remove, which plain
 * `kexec -e` pays once per controller, serially, in device_shutdown().
 * pci_device_shutdown() clears bus mastering after it when kexec_in_progress.
 */
static void slowdev_shutdown(struct pci_dev *pdev)
{
	msleep(shutdown_ms);
	dev_info(&pdev->dev, "slowdev shut down after %u ms\n", shutdown_ms);
}

static const struct pci_device_id slowdev_ids[] = {
	{ PCI_DEVICE(0x1234, 0x11e8) }, /* QEMU's edu device */
	{}
};
MODULE_DEVICE_TABLE(pci, slowdev_ids);

static struct pci_driver slowdev_driver = {
	.name = "petitkexec_slowdev",
	.id_table = slowdev_ids,
	.probe = slowdev_probe,
	.remove = slowdev_remove,
	.shutdown = slowdev_shutdown,
};
module_pci_driver(slowdev_driver);

MODULE_DESCRIPTION("A slow PCI driver for QEMU's edu device (petitkexec's tests only)");
MODULE_LICENSE("GPL");
